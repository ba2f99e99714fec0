//! Packet builders for fixtures: Ethernet (+ one 802.1Q tag), IPv4 (options, every field
//! overridable), IPv6, UDP/TCP with correct checksums, ESP; the *expected* encapsulated outputs
//! (outer IPv4/IPv6, optional GUE) written from docs/datapath.md independently of the XDP code; and
//! checksum verification helpers.
//!
//! Every field that a malformed-packet fixture may want to lie about is an `Option` (None = the
//! correct value computed at build time) or a plain public field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vpnlb_common::FlowKey;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// IPv4 "don't fragment" and "more fragments" bits of the flags/offset word.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;

pub type Mac = [u8; 6];

/// Ethernet header with at most one 802.1Q tag (a second tag is written by hand in QinQ cases).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eth {
    pub dst: Mac,
    pub src: Mac,
    /// 802.1Q TCI (PCP/DEI/VID); None = untagged.
    pub vlan: Option<u16>,
    /// EtherType after the tag (or of the untagged frame); None = from the L3 header.
    pub ethertype: Option<u16>,
}

impl Eth {
    pub fn new(dst: Mac, src: Mac) -> Self {
        Eth {
            dst,
            src,
            vlan: None,
            ethertype: None,
        }
    }

    pub fn len(&self) -> usize {
        if self.vlan.is_some() { 18 } else { 14 }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn write(&self, out: &mut Vec<u8>, ethertype: u16) {
        out.extend_from_slice(&self.dst);
        out.extend_from_slice(&self.src);
        if let Some(tci) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        out.extend_from_slice(&self.ethertype.unwrap_or(ethertype).to_be_bytes());
    }
}

/// IPv4 header; `None` fields are computed (correct) at build time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub version: u8,
    /// Header length in 32-bit words; None = 5 + options.
    pub ihl: Option<u8>,
    pub tos: u8,
    /// None = header + L4 bytes.
    pub total_len: Option<u16>,
    pub id: u16,
    /// Flags (DF/MF) and fragment offset (in 8-byte units) as on the wire.
    pub flags_frag: u16,
    pub ttl: u8,
    /// None = from the L4 part.
    pub proto: Option<u8>,
    /// None = correct header checksum.
    pub checksum: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Raw option bytes (padded by the caller to a multiple of 4 for a consistent IHL).
    pub options: Vec<u8>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Ipv4 {
            version: 4,
            ihl: None,
            tos: 0,
            total_len: None,
            id: 0x1234,
            flags_frag: IPV4_DF,
            ttl: 64,
            proto: None,
            checksum: None,
            src,
            dst,
            options: Vec::new(),
        }
    }

    /// The header bytes for `payload_len` bytes of payload and protocol `proto`.
    pub fn header(&self, payload_len: usize, proto: u8) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
        let total = self.total_len.unwrap_or((hlen + payload_len) as u16);
        let mut h = Vec::with_capacity(hlen);
        h.push((self.version << 4) | (ihl & 0x0f));
        h.push(self.tos);
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.flags_frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.proto.unwrap_or(proto));
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let csum = self.checksum.unwrap_or_else(|| internet_checksum(&h));
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h
    }
}

/// IPv6 fixed header; `None` fields are computed at build time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub version: u8,
    pub tclass: u8,
    pub flow_label: u32,
    /// None = L4 bytes.
    pub payload_len: Option<u16>,
    /// None = from the L4 part.
    pub next_header: Option<u8>,
    pub hop_limit: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Ipv6 {
            version: 6,
            tclass: 0,
            flow_label: 0x1_2345,
            payload_len: None,
            next_header: None,
            hop_limit: 64,
            src,
            dst,
        }
    }

    pub fn header(&self, payload_len: usize, next_header: u8) -> Vec<u8> {
        let mut h = Vec::with_capacity(40);
        let w0 = ((self.version as u32) << 28)
            | ((self.tclass as u32) << 20)
            | (self.flow_label & 0xf_ffff);
        h.extend_from_slice(&w0.to_be_bytes());
        h.extend_from_slice(&self.payload_len.unwrap_or(payload_len as u16).to_be_bytes());
        h.push(self.next_header.unwrap_or(next_header));
        h.push(self.hop_limit);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ip {
    V4(Ipv4),
    V6(Ipv6),
}

impl Ip {
    pub fn src(&self) -> IpAddr {
        match self {
            Ip::V4(h) => IpAddr::V4(h.src),
            Ip::V6(h) => IpAddr::V6(h.src),
        }
    }
    pub fn dst(&self) -> IpAddr {
        match self {
            Ip::V4(h) => IpAddr::V4(h.dst),
            Ip::V6(h) => IpAddr::V6(h.dst),
        }
    }
}

/// The L4 part of a frame. UDP/TCP checksums are computed over the pseudo-header of the `Ip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
        /// None = 8 + payload.
        len: Option<u16>,
        /// None = correct checksum.
        checksum: Option<u16>,
        payload: Vec<u8>,
    },
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        /// Data offset in words; None = 5 + options.
        doff: Option<u8>,
        flags: u8,
        window: u16,
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    Esp {
        spi: u32,
        seq: u32,
        payload: Vec<u8>,
    },
    /// Raw bytes under protocol `proto` (truncated headers, extension headers, ICMP, ...).
    Raw { proto: u8, bytes: Vec<u8> },
}

impl L4 {
    pub fn proto(&self) -> u8 {
        match self {
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Esp { .. } => IPPROTO_ESP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The first four bytes as the flow key's `ports` word.
    pub fn ports_word(&self) -> u32 {
        let b = self.bytes_with(None);
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The L4 bytes; `pseudo` is the pseudo-header sum input (src, dst) for the checksum.
    fn bytes_with(&self, pseudo: Option<(&IpAddr, &IpAddr)>) -> Vec<u8> {
        match self {
            L4::Udp {
                sport,
                dport,
                len,
                checksum,
                payload,
            } => {
                let mut b = Vec::with_capacity(8 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&len.unwrap_or((8 + payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                let c = match (checksum, pseudo) {
                    (Some(c), _) => *c,
                    (None, Some((s, d))) => {
                        let c = l4_checksum(s, d, IPPROTO_UDP, &b);
                        if c == 0 { 0xffff } else { c }
                    }
                    (None, None) => 0,
                };
                b[6..8].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                doff,
                flags,
                window,
                options,
                payload,
            } => {
                let hlen = 20 + options.len();
                let mut b = Vec::with_capacity(hlen + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&ack.to_be_bytes());
                b.push(doff.unwrap_or((hlen / 4) as u8) << 4);
                b.push(*flags);
                b.extend_from_slice(&window.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(options);
                b.extend_from_slice(payload);
                if let Some((s, d)) = pseudo {
                    let c = l4_checksum(s, d, IPPROTO_TCP, &b);
                    b[16..18].copy_from_slice(&c.to_be_bytes());
                }
                b
            }
            L4::Esp { spi, seq, payload } => {
                let mut b = Vec::with_capacity(8 + payload.len());
                b.extend_from_slice(&spi.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(payload);
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }
}

/// A whole Ethernet frame: L2, L3, L4, then `trailer` bytes (Ethernet padding, garbage) that are
/// not counted in any IP length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub eth: Eth,
    pub ip: Ip,
    pub l4: L4,
    pub trailer: Vec<u8>,
}

/// MACs used by fixtures: a client-side router and the load balancer's NIC.
pub const MAC_ROUTER: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_LB: Mac = [0x02, 0, 0, 0, 0, 0x10];

impl Frame {
    pub fn new(ip: Ip, l4: L4) -> Self {
        Frame {
            eth: Eth::new(MAC_LB, MAC_ROUTER),
            ip,
            l4,
            trailer: Vec::new(),
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Self {
        Self::new(
            ip_pair(src, dst),
            L4::Udp {
                sport,
                dport,
                len: None,
                checksum: None,
                payload: payload.to_vec(),
            },
        )
    }

    pub fn tcp(
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Self {
        Self::new(
            ip_pair(src, dst),
            L4::Tcp {
                sport,
                dport,
                seq: 0x0102_0304,
                ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
                doff: None,
                flags,
                window: 64240,
                options: Vec::new(),
                payload: payload.to_vec(),
            },
        )
    }

    pub fn esp(src: IpAddr, dst: IpAddr, spi: u32, seq: u32, payload: &[u8]) -> Self {
        Self::new(
            ip_pair(src, dst),
            L4::Esp {
                spi,
                seq,
                payload: payload.to_vec(),
            },
        )
    }

    pub fn raw(src: IpAddr, dst: IpAddr, proto: u8, bytes: &[u8]) -> Self {
        Self::new(
            ip_pair(src, dst),
            L4::Raw {
                proto,
                bytes: bytes.to_vec(),
            },
        )
    }

    pub fn vlan(mut self, tci: u16) -> Self {
        self.eth.vlan = Some(tci);
        self
    }

    pub fn macs(mut self, dst: Mac, src: Mac) -> Self {
        self.eth.dst = dst;
        self.eth.src = src;
        self
    }

    /// Pads the frame with zeros to `len` bytes (as Ethernet pads short frames to 60).
    pub fn pad_to(mut self, len: usize) -> Self {
        let have = self.bytes().len() - self.trailer.len();
        self.trailer = vec![0; len.saturating_sub(have)];
        self
    }

    pub fn v4(&mut self) -> &mut Ipv4 {
        match &mut self.ip {
            Ip::V4(h) => h,
            Ip::V6(_) => panic!("frame is IPv6"),
        }
    }

    pub fn v6(&mut self) -> &mut Ipv6 {
        match &mut self.ip {
            Ip::V6(h) => h,
            Ip::V4(_) => panic!("frame is IPv4"),
        }
    }

    pub fn l2_len(&self) -> usize {
        self.eth.len()
    }

    /// The L4 bytes (with checksums computed over this frame's addresses).
    pub fn l4_bytes(&self) -> Vec<u8> {
        let (s, d) = (self.ip.src(), self.ip.dst());
        self.l4.bytes_with(Some((&s, &d)))
    }

    /// The L3 packet (IP header + L4), without trailer.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut out = match &self.ip {
            Ip::V4(h) => h.header(l4.len(), self.l4.proto()),
            Ip::V6(h) => h.header(l4.len(), self.l4.proto()),
        };
        out.extend_from_slice(&l4);
        out
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let et = match self.ip {
            Ip::V4(_) => ETH_P_IPV4,
            Ip::V6(_) => ETH_P_IPV6,
        };
        self.eth.write(&mut out, et);
        out.extend_from_slice(&self.ip_bytes());
        out.extend_from_slice(&self.trailer);
        out
    }

    /// The flow key the data plane must derive (docs/datapath.md stage 2).
    pub fn flow_key(&self) -> FlowKey {
        let (src, family) = vpnlb_common::addr_words(self.ip.src());
        let (dst, _) = vpnlb_common::addr_words(self.ip.dst());
        FlowKey {
            src,
            dst,
            ports: self.l4.ports_word(),
            proto: self.l4.proto(),
            family,
            _pad: [0; 2],
        }
    }

    /// DSCP/ECN byte of the IP header (the outer `tos` of an encapsulation).
    pub fn tos(&self) -> u8 {
        match &self.ip {
            Ip::V4(h) => h.tos,
            Ip::V6(h) => h.tclass,
        }
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

fn ip_pair(src: IpAddr, dst: IpAddr) -> Ip {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ip::V4(Ipv4::new(s, d)),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ip::V6(Ipv6::new(s, d)),
        _ => panic!("mixed address families {src} -> {dst}"),
    }
}

/// An ARP request frame (`who-has target tell sender`), broadcast.
pub fn arp_request(sender_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(60);
    Eth::new([0xff; 6], sender_mac).write(&mut out, ETH_P_ARP);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&sender_mac);
    out.extend_from_slice(&sender.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out.resize(60, 0);
    out
}

/// `f`'s datagram split into IP fragments of at most `chunk` L4 bytes each (a multiple of 8),
/// identification `id`: IPv4 with MF/offset, IPv6 with a Fragment header. The first carries the
/// L4 header; every fragment keeps `f`'s Ethernet header, addresses and TOS.
pub fn fragments(f: &Frame, chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(
        chunk > 0 && chunk.is_multiple_of(8),
        "fragment size must be a multiple of 8"
    );
    let l4 = f.l4_bytes();
    let proto = f.l4.proto();
    let n = l4.len().div_ceil(chunk);
    (0..n)
        .map(|i| {
            let part = &l4[i * chunk..l4.len().min((i + 1) * chunk)];
            let units = (i * chunk / 8) as u16;
            let more = i + 1 < n;
            let mut g = f.clone();
            match &mut g.ip {
                Ip::V4(h) => {
                    h.id = id as u16;
                    h.flags_frag = units | if more { IPV4_MF } else { 0 };
                    h.proto = Some(proto);
                    g.l4 = L4::Raw {
                        proto,
                        bytes: part.to_vec(),
                    };
                }
                Ip::V6(_) => {
                    let mut b = ipv6_fragment_header(proto, units, more, id);
                    b.extend_from_slice(part);
                    g.l4 = L4::Raw {
                        proto: IPPROTO_FRAGMENT,
                        bytes: b,
                    };
                }
            }
            g.bytes()
        })
        .collect()
}

/// An ICMP "fragmentation needed" (type 3 code 4) or, between IPv6 addresses, ICMPv6 "packet too
/// big" (type 2) from `from` to `to`, quoting `quoted` (an IP packet, possibly truncated) with
/// next-hop `mtu`; checksums correct.
pub fn icmp_too_big(from: IpAddr, to: IpAddr, mtu: u16, quoted: &[u8]) -> Frame {
    let v6 = from.is_ipv6();
    let mut m = if v6 {
        vec![2, 0, 0, 0, 0, 0]
    } else {
        vec![3, 4, 0, 0, 0, 0]
    };
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let (proto, csum) = if v6 {
        (58, l4_checksum(&from, &to, 58, &m))
    } else {
        (IPPROTO_ICMP, internet_checksum(&m))
    };
    m[2..4].copy_from_slice(&csum.to_be_bytes());
    Frame::raw(from, to, proto, &m)
}

/// An IPv6 Fragment extension header (8 bytes) announcing `next` after it.
pub fn ipv6_fragment_header(next: u8, offset_units: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset_units << 3) | more as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// A generic 8-byte IPv6 extension header (Hop-by-Hop/Destination options with PadN).
pub fn ipv6_options_header(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// UDP bytes (header + payload) with a correct checksum for `src` → `dst`.
pub fn udp_bytes(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    L4::Udp {
        sport,
        dport,
        len: None,
        checksum: None,
        payload: payload.to_vec(),
    }
    .bytes_with(Some((&src, &dst)))
}

/// What a well-formed frame (e.g. from a real capture) carries, read the plain way: L2 length,
/// IP version, fragment bits and the flow key of a UDP/TCP/ESP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub l2_len: usize,
    pub version: u8,
    /// IPv4 MF flag or fragment offset set.
    pub fragment: bool,
    /// IPv4 fragment offset (8-byte units) and MF flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub proto: u8,
    /// Offset of the L4 header in the frame.
    pub l4: usize,
    pub src: IpAddr,
    pub dst: IpAddr,
}

impl Parsed {
    /// The flow key of an unfragmented UDP/TCP/ESP packet.
    pub fn flow_key(&self, frame: &[u8]) -> FlowKey {
        let (src, family) = vpnlb_common::addr_words(self.src);
        let (dst, _) = vpnlb_common::addr_words(self.dst);
        let p = &frame[self.l4..self.l4 + 4];
        FlowKey {
            src,
            dst,
            ports: u32::from_ne_bytes([p[0], p[1], p[2], p[3]]),
            proto: self.proto,
            family,
            _pad: [0; 2],
        }
    }

    /// UDP/TCP destination port.
    pub fn dport(&self, frame: &[u8]) -> u16 {
        u16::from_be_bytes([frame[self.l4 + 2], frame[self.l4 + 3]])
    }

    /// UDP payload (after the 8-byte header).
    pub fn udp_payload<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[self.l4 + 8..]
    }
}

/// Parses Ethernet (+ one 802.1Q tag) and an IPv4/IPv6 header without extension headers; None
/// for anything else.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let mut l2 = 14;
    let mut et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if et == ETH_P_8021Q {
        et = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        l2 = 18;
    }
    let ip = frame.get(l2..)?;
    match et {
        ETH_P_IPV4 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let ff = u16::from_be_bytes([ip[6], ip[7]]);
            let off = ff & 0x1fff;
            let mf = ff & IPV4_MF != 0;
            Some(Parsed {
                l2_len: l2,
                version: 4,
                fragment: mf || off != 0,
                frag_offset: off,
                more_fragments: mf,
                proto: ip[9],
                l4: l2 + ihl,
                src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
            })
        }
        ETH_P_IPV6 if ip.len() >= 40 && ip[0] >> 4 == 6 => Some(Parsed {
            l2_len: l2,
            version: 6,
            fragment: ip[6] == IPPROTO_FRAGMENT,
            frag_offset: 0,
            more_fragments: false,
            proto: ip[6],
            l4: l2 + 40,
            src: IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?)),
            dst: IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?)),
        }),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums

/// One's-complement sum of 16-bit big-endian words (odd trailing byte padded with zero), folded.
pub fn ones_sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        acc += (*b as u32) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// RFC 1071 Internet checksum of `data` (with the checksum field zeroed by the caller).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !(ones_sum(data, 0) as u16)
}

fn pseudo_sum(src: &IpAddr, dst: &IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = ones_sum(&s.octets(), acc);
            acc = ones_sum(&d.octets(), acc);
            acc += proto as u32;
            acc += len as u32;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = ones_sum(&s.octets(), acc);
            acc = ones_sum(&d.octets(), acc);
            acc += (len as u32) >> 16;
            acc += len as u32 & 0xffff;
            acc += proto as u32;
        }
        _ => panic!("mixed families"),
    }
    acc
}

/// UDP/TCP checksum over the pseudo-header and `segment` (whose checksum field must be zero).
pub fn l4_checksum(src: &IpAddr, dst: &IpAddr, proto: u8, segment: &[u8]) -> u16 {
    !(ones_sum(segment, pseudo_sum(src, dst, proto, segment.len())) as u16)
}

/// True when an IPv4 header (with its checksum in place) sums to 0xffff.
pub fn ipv4_header_checksum_ok(hdr: &[u8]) -> bool {
    ones_sum(hdr, 0) == 0xffff
}

/// True when a UDP/TCP segment (checksum in place) verifies; a UDP checksum of 0 over IPv4 means
/// "none" and verifies; over IPv6 it is accepted only when `allow_zero_v6` (RFC 6935 tunnels).
pub fn l4_checksum_ok(
    src: &IpAddr,
    dst: &IpAddr,
    proto: u8,
    segment: &[u8],
    allow_zero_v6: bool,
) -> bool {
    if proto == IPPROTO_UDP && segment.len() >= 8 && segment[6..8] == [0, 0] {
        return src.is_ipv4() || allow_zero_v6;
    }
    ones_sum(segment, pseudo_sum(src, dst, proto, segment.len())) == 0xffff
}

// ---------------------------------------------------------------------------------------------
// Expected encapsulated output (docs/datapath.md, stage 5), written from the spec.

/// Encapsulation kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Ipip,
    /// GUE variant 1 with this UDP destination port.
    Gue {
        port: u16,
    },
}

/// Everything the expected encapsulated frame depends on.
#[derive(Clone, Debug)]
pub struct EncapSpec {
    pub kind: Encap,
    /// Next-hop MAC (`b.mac`) and egress MAC (`b.src_mac`).
    pub dst_mac: Mac,
    pub src_mac: Mac,
    /// Outer source: already combined with the hash (see [`outer_src_v4`] / [`outer_src_v6`]).
    pub outer_src: IpAddr,
    /// Backend address (`b.addr`).
    pub outer_dst: IpAddr,
    /// The flow hash (`pick_hash` of the key under the VIP's flags).
    pub hash: u32,
}

/// `(encap_src_v4 & !mask) | (hash & mask)`, in wire-order words (the words hold the address bytes
/// as they sit in memory; on this little-endian host that is `from_le_bytes(octets)`).
pub fn outer_src_v4(src: Ipv4Addr, mask: Ipv4Addr, hash: u32) -> Ipv4Addr {
    let s = u32::from_le_bytes(src.octets());
    let m = u32::from_le_bytes(mask.octets());
    Ipv4Addr::from(((s & !m) | (hash & m)).to_le_bytes())
}

/// `encap_src_v6` with word 3 = `(w3 & !mask) | (hash & mask)`, `mask` a wire-order word given here
/// as the 4 address bytes it covers.
pub fn outer_src_v6(src: Ipv6Addr, mask_bytes: [u8; 4], hash: u32) -> Ipv6Addr {
    let mut o = src.octets();
    let w3 = u32::from_le_bytes([o[12], o[13], o[14], o[15]]);
    let m = u32::from_le_bytes(mask_bytes);
    o[12..16].copy_from_slice(&((w3 & !m) | (hash & m)).to_le_bytes());
    Ipv6Addr::from(o)
}

/// The frame `vpnlb_ingress` must emit when it encapsulates `input` (whose L2 header is `l2_len`
/// bytes) per `spec`.
pub fn encapsulate(input: &[u8], l2_len: usize, spec: &EncapSpec) -> Vec<u8> {
    let inner = &input[l2_len..];
    let inner_v = inner[0] >> 4;
    let tos = match inner_v {
        4 => inner[1],
        6 => (inner[0] << 4) | (inner[1] >> 4),
        v => panic!("inner IP version {v}"),
    };
    let inner_proto = if inner_v == 4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let (proto, l4): (u8, Vec<u8>) = match spec.kind {
        Encap::Ipip => (inner_proto, Vec::new()),
        Encap::Gue { port } => {
            let mut u = Vec::with_capacity(8);
            u.extend_from_slice(&(0xc000 | (spec.hash & 0x3fff) as u16).to_be_bytes());
            u.extend_from_slice(&port.to_be_bytes());
            u.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            (IPPROTO_UDP, u)
        }
    };
    let payload_len = l4.len() + inner.len();
    let outer = match (spec.outer_src, spec.outer_dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4::new(s, d);
            h.tos = tos;
            h.id = 0;
            h.flags_frag = IPV4_DF;
            h.ttl = 64;
            h.header(payload_len, proto)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = Ipv6::new(s, d);
            h.tclass = tos;
            h.flow_label = spec.hash & 0xf_ffff;
            h.hop_limit = 64;
            h.header(payload_len, proto)
        }
        _ => panic!("mixed outer families"),
    };
    let mut out = Vec::with_capacity(input.len() + outer.len() + l4.len());
    out.extend_from_slice(&spec.dst_mac);
    out.extend_from_slice(&spec.src_mac);
    // Everything between the MACs and the innermost EtherType (the VLAN tag) is kept.
    out.extend_from_slice(&input[12..l2_len - 2]);
    let et = if spec.outer_dst.is_ipv4() {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    };
    out.extend_from_slice(&et.to_be_bytes());
    out.extend_from_slice(&outer);
    out.extend_from_slice(&l4);
    out.extend_from_slice(inner);
    out
}

/// The frame an L2 DSR forward must emit: only the two MACs change.
pub fn l2dsr(input: &[u8], dst_mac: Mac, src_mac: Mac) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out
}

/// Checks the outer headers of an encapsulated frame: IPv4 header checksum, lengths, and (GUE) a
/// zero UDP checksum or a valid one. Returns a description of the first problem.
pub fn check_outer(frame: &[u8], l2_len: usize) -> Result<(), String> {
    let l3 = frame.get(l2_len..).ok_or("frame shorter than L2")?;
    match l3.first().map(|b| b >> 4) {
        Some(4) => {
            if l3.len() < 20 {
                return Err("outer IPv4 truncated".into());
            }
            if !ipv4_header_checksum_ok(&l3[..20]) {
                return Err(format!(
                    "outer IPv4 header checksum {:02x}{:02x} invalid",
                    l3[10], l3[11]
                ));
            }
            let tot = u16::from_be_bytes([l3[2], l3[3]]) as usize;
            if tot != l3.len() {
                return Err(format!(
                    "outer total length {tot} != {} bytes present",
                    l3.len()
                ));
            }
            if l3[9] == IPPROTO_UDP {
                let s = IpAddr::V4(Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]));
                let d = IpAddr::V4(Ipv4Addr::new(l3[16], l3[17], l3[18], l3[19]));
                check_udp(&s, &d, &l3[20..])?;
            }
            Ok(())
        }
        Some(6) => {
            if l3.len() < 40 {
                return Err("outer IPv6 truncated".into());
            }
            let pl = u16::from_be_bytes([l3[4], l3[5]]) as usize;
            if pl + 40 != l3.len() {
                return Err(format!(
                    "outer payload length {pl} != {} bytes present",
                    l3.len() - 40
                ));
            }
            if l3[6] == IPPROTO_UDP {
                let s = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&l3[8..24]).unwrap()));
                let d = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&l3[24..40]).unwrap()));
                check_udp(&s, &d, &l3[40..])?;
            }
            Ok(())
        }
        v => Err(format!("outer IP version {v:?}")),
    }
}

fn check_udp(s: &IpAddr, d: &IpAddr, seg: &[u8]) -> Result<(), String> {
    if seg.len() < 8 {
        return Err("outer UDP truncated".into());
    }
    let ulen = u16::from_be_bytes([seg[4], seg[5]]) as usize;
    if ulen != seg.len() {
        return Err(format!(
            "outer UDP length {ulen} != {} bytes present",
            seg.len()
        ));
    }
    if !l4_checksum_ok(s, d, IPPROTO_UDP, seg, true) {
        return Err("outer UDP checksum invalid".into());
    }
    Ok(())
}

/// Hex dump, 16 bytes a line, marking lines that differ from `other` with `!`.
pub fn hexdump_diff(a: &[u8], other: &[u8]) -> String {
    let mut s = String::new();
    let n = a.len().max(other.len());
    for off in (0..n).step_by(16) {
        let la = a.get(off..(off + 16).min(a.len())).unwrap_or(&[]);
        let lb = other.get(off..(off + 16).min(other.len())).unwrap_or(&[]);
        let mark = if la == lb { ' ' } else { '!' };
        let hex: Vec<String> = la.iter().map(|b| format!("{b:02x}")).collect();
        s.push_str(&format!("{mark}{off:04x}: {}\n", hex.join(" ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_checksum_matches_rfc1071_example() {
        // Header from RFC 1071-style textbook example (Wikipedia "IPv4 header checksum").
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        let b = Ipv4 {
            id: 0,
            ..Ipv4::new(
                Ipv4Addr::new(192, 168, 0, 1),
                Ipv4Addr::new(192, 168, 0, 199),
            )
        }
        .header(0x73 - 20, IPPROTO_UDP);
        assert_eq!(&b[10..12], &[0xb8, 0x61]);
        assert!(ipv4_header_checksum_ok(&b));
    }

    #[test]
    fn udp_checksums_verify() {
        for (s, d) in [
            (
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap(),
            ),
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap()),
        ] {
            let f = Frame::udp(s, 1234, d, 51820, b"hello wireguard");
            let b = f.bytes();
            let l4 = &b[f.l2_len() + if s.is_ipv4() { 20 } else { 40 }..];
            assert!(l4_checksum_ok(&s, &d, IPPROTO_UDP, l4, false));
            let t = Frame::tcp(s, 1234, d, 443, TCP_ACK | TCP_PSH, b"odd");
            let b = t.bytes();
            let l4 = &b[t.l2_len() + if s.is_ipv4() { 20 } else { 40 }..];
            assert!(l4_checksum_ok(&s, &d, IPPROTO_TCP, l4, false));
        }
    }

    #[test]
    fn encap_layout() {
        let f = Frame::udp(
            "10.1.0.1".parse().unwrap(),
            1000,
            "10.9.0.1".parse().unwrap(),
            500,
            b"ike",
        )
        .vlan(7);
        let input = f.bytes();
        let spec = EncapSpec {
            kind: Encap::Gue { port: 6080 },
            dst_mac: [2, 0, 0, 0, 0, 0xaa],
            src_mac: [2, 0, 0, 0, 0, 0xbb],
            outer_src: "192.0.2.1".parse().unwrap(),
            outer_dst: "192.0.2.99".parse().unwrap(),
            hash: 0xdead_beef,
        };
        let out = encapsulate(&input, 18, &spec);
        assert_eq!(out.len(), input.len() + 28);
        assert_eq!(&out[12..16], &[0x81, 0x00, 0x00, 0x07]);
        assert_eq!(&out[16..18], &[0x08, 0x00]);
        check_outer(&out, 18).unwrap();
        assert_eq!(
            u16::from_be_bytes([out[38], out[39]]),
            0xc000 | (0xbeef & 0x3fff)
        );
        assert_eq!(&out[46..], &input[18..]);
    }

    #[test]
    fn outer_src_masks() {
        let a = outer_src_v4(
            Ipv4Addr::new(192, 0, 2, 0),
            Ipv4Addr::new(0, 0, 0, 255),
            0xab00_0000,
        );
        assert_eq!(a, Ipv4Addr::new(192, 0, 2, 0xab));
        let b = outer_src_v6("fd00:1::".parse().unwrap(), [0, 0, 0xff, 0xff], 0x1234_5678);
        // Wire-order word: the low hash bytes land first in memory.
        assert_eq!(b, "fd00:1::3412".parse::<Ipv6Addr>().unwrap());
    }
}

/// VPN payloads that carry gateway-chosen session ids (docs/datapath.md, "Session ids"), written
/// from the protocols' wire formats for fixtures and the differential test.
pub mod vpn {
    /// A WireGuard message of `msg_type` (1..=4) at its real length, with `receiver` (the gateway's
    /// index, little-endian) where the type carries one: type 2 at 8, types 3 and 4 at 4.
    pub fn wireguard(msg_type: u8, receiver: u32) -> Vec<u8> {
        let len = match msg_type {
            1 => 148,
            2 => 92,
            3 => 64,
            _ => 32,
        };
        let mut p: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
        p[..4].copy_from_slice(&[msg_type, 0, 0, 0]);
        let at = if msg_type == 2 { 8 } else { 4 };
        if msg_type != 1 {
            p[at..at + 4].copy_from_slice(&receiver.to_le_bytes());
        }
        p
    }

    /// An IKEv2 header (28 bytes, IKE_AUTH request) with these SPIs, then `body` bytes.
    pub fn ike(initiator_spi: u64, responder_spi: u64, body: usize) -> Vec<u8> {
        let len = 28 + body;
        let mut p = Vec::with_capacity(len);
        p.extend_from_slice(&initiator_spi.to_be_bytes());
        p.extend_from_slice(&responder_spi.to_be_bytes());
        // Next payload SK (46), version 2.0, exchange IKE_AUTH (35), flags: initiator, message id 1.
        p.extend_from_slice(&[46, 0x20, 35, 0x08, 0, 0, 0, 1]);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend((0..body).map(|i| (i * 7 + 1) as u8));
        p
    }

    /// IKE on the NAT-T port: the 4-byte non-ESP marker, then the IKE message.
    pub fn natt_ike(initiator_spi: u64, responder_spi: u64, body: usize) -> Vec<u8> {
        let mut p = vec![0; 4];
        p.extend(ike(initiator_spi, responder_spi, body));
        p
    }

    /// ESP-in-UDP (RFC 3948): SPI, sequence number, `body` bytes of ciphertext.
    pub fn esp_in_udp(spi: u32, seq: u32, body: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(8 + body);
        p.extend_from_slice(&spi.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend((0..body).map(|i| (i * 11 + 2) as u8));
        p
    }

    /// The NAT-T keepalive: one 0xff byte.
    pub const NATT_KEEPALIVE: [u8; 1] = [0xff];

    /// OpenVPN `P_DATA_V2` (opcode 9, key id 1) with the 24-bit `peer_id`, then `body` bytes.
    pub fn openvpn_data_v2(peer_id: u32, body: usize) -> Vec<u8> {
        let mut p = vec![(9 << 3) | 1];
        p.extend_from_slice(&peer_id.to_be_bytes()[1..]);
        p.extend((0..body).map(|i| (i * 3 + 9) as u8));
        p
    }

    /// OpenVPN `P_DATA_V1` (opcode 6, key id 1): no peer-id.
    pub fn openvpn_data_v1(body: usize) -> Vec<u8> {
        let mut p = vec![(6 << 3) | 1];
        p.extend((0..body).map(|i| (i * 3 + 9) as u8));
        p
    }
}
