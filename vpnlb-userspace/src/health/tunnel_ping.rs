//! The packets of a ping through a tunnel, pure: an ICMP (IPv4) or ICMPv6 echo request as a whole
//! IP packet (what a client's tun device hands its VPN daemon), and the check of a decrypted
//! packet that should be its echo reply. The `wireguard` check's `inside` probe encrypts the one
//! with boringtun and feeds what comes back to the other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ICMP_ECHO: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP6_ECHO: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const TTL: u8 = 64;
/// Marks the payload as ours (after it: the 8-byte token).
const MARKER: &[u8; 8] = b"vpnlb-in";

/// One echo of the probe: who pings whom, and what identifies the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo {
    /// The probe's address in the tunnel.
    pub src: IpAddr,
    /// The host behind the gateway.
    pub dst: IpAddr,
    pub ident: u16,
    pub seq: u16,
    /// Random per probe: a late reply to an earlier probe never counts.
    pub token: [u8; 8],
}

/// Why a decrypted packet is not the awaited reply (a short reason for the probe's detail).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotOurs {
    /// Not an IPv4/IPv6 packet of the probe's family, or cut short.
    Malformed(&'static str),
    /// An ICMP error from the gateway or a router behind it (unreachable, TTL exceeded).
    Error { from: IpAddr, detail: String },
    /// Something else (another echo, another host): ignored.
    Other,
}

impl Echo {
    /// The whole IP packet of the echo request (IPv4 + ICMP, or IPv6 + ICMPv6).
    pub fn request(&self) -> Vec<u8> {
        let mut icmp = Vec::with_capacity(8 + 16);
        let ty = if self.src.is_ipv4() {
            ICMP_ECHO
        } else {
            ICMP6_ECHO
        };
        icmp.extend_from_slice(&[ty, 0, 0, 0]);
        icmp.extend_from_slice(&self.ident.to_be_bytes());
        icmp.extend_from_slice(&self.seq.to_be_bytes());
        icmp.extend_from_slice(MARKER);
        icmp.extend_from_slice(&self.token);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let c = checksum(&[&icmp]);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                let mut p = ipv4_header(s, d, icmp.len());
                p.extend_from_slice(&icmp);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let c = checksum(&[&pseudo_v6(s, d, icmp.len()), &icmp]);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                let mut p = ipv6_header(s, d, icmp.len());
                p.extend_from_slice(&icmp);
                p
            }
            // The config refuses mixed families; a mismatch here sends a packet that no one
            // answers rather than panicking.
            _ => Vec::new(),
        }
    }

    /// Whether `packet` (decrypted, a whole IP packet) is the reply to this echo: from `dst` to
    /// `src`, an echo reply with our id, sequence and payload, and a valid checksum.
    pub fn check_reply(&self, packet: &[u8]) -> Result<(), NotOurs> {
        let (from, to, proto, body) = ip_payload(packet)?;
        let v6 = self.src.is_ipv6();
        let want_proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        if proto != want_proto || body.len() < 8 {
            return Err(NotOurs::Other);
        }
        let sum = match (from, to) {
            (IpAddr::V6(f), IpAddr::V6(t)) => checksum(&[&pseudo_v6(f, t, body.len()), body]),
            _ => checksum(&[body]),
        };
        if sum != 0 {
            return Err(NotOurs::Malformed("bad ICMP checksum"));
        }
        let (ty, code) = (body[0], body[1]);
        let reply = if v6 {
            ICMP6_ECHO_REPLY
        } else {
            ICMP_ECHO_REPLY
        };
        if ty != reply {
            return match error_detail(v6, ty, code) {
                Some(detail) if to == self.src => Err(NotOurs::Error { from, detail }),
                _ => Err(NotOurs::Other),
            };
        }
        let ident = u16::from_be_bytes([body[4], body[5]]);
        let seq = u16::from_be_bytes([body[6], body[7]]);
        let payload = &body[8..];
        let ours = from == self.dst
            && to == self.src
            && ident == self.ident
            && seq == self.seq
            && payload.len() >= 16
            && &payload[..8] == MARKER
            && payload[8..16] == self.token;
        if ours { Ok(()) } else { Err(NotOurs::Other) }
    }
}

/// (source, destination, protocol, payload) of an IPv4 or IPv6 packet (IPv6 extension headers
/// are not walked: an echo reply carries none).
fn ip_payload(p: &[u8]) -> Result<(IpAddr, IpAddr, u8, &[u8]), NotOurs> {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            if p.len() < 20 {
                return Err(NotOurs::Malformed("short IPv4 header"));
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if ihl < 20 || total < ihl || total > p.len() {
                return Err(NotOurs::Malformed("bad IPv4 lengths"));
            }
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            Ok((src.into(), dst.into(), p[9], &p[ihl..total]))
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(NotOurs::Malformed("short IPv6 header"));
            }
            let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
            if 40 + len > p.len() {
                return Err(NotOurs::Malformed("bad IPv6 length"));
            }
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&p[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Ok((a(8), a(24), p[6], &p[40..40 + len]))
        }
        _ => Err(NotOurs::Malformed("not an IP packet")),
    }
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let total = (20 + payload) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    // Identification 0, don't fragment.
    h.extend_from_slice(&[0, 0, 0x40, 0, TTL, PROTO_ICMP, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload as u16).to_be_bytes());
    h.extend_from_slice(&[PROTO_ICMPV6, TTL]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// The ICMPv6 pseudo header (RFC 8200 8.1).
fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
    p
}

/// The Internet checksum over the concatenation of `parts` (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A short text for an ICMP error type, or None for types that are not errors.
fn error_detail(v6: bool, ty: u8, code: u8) -> Option<String> {
    let what = match (v6, ty) {
        (false, 3) => match code {
            0 => "network unreachable",
            1 => "host unreachable",
            3 => "port unreachable",
            9 | 10 | 13 => "administratively prohibited",
            _ => "destination unreachable",
        },
        (false, 11) => "time exceeded",
        (true, 1) => match code {
            0 => "no route",
            1 | 5 | 6 => "administratively prohibited",
            3 => "address unreachable",
            _ => "destination unreachable",
        },
        (true, 3) => "time exceeded",
        _ => return None,
    };
    Some(what.to_string())
}

/// Test helpers: what the host behind the gateway and a router on the way send back.
#[cfg(test)]
pub(crate) mod answer {
    use super::*;

    /// The echo reply to the request `req` (addresses swapped, type changed, checksums fixed).
    pub(crate) fn echo_reply(req: &[u8]) -> Vec<u8> {
        answer(req, req[0] >> 4 == 6)
    }

    /// A "host unreachable" from `router` to the request's source, quoting the request (IPv4).
    pub(crate) fn unreachable(router: Ipv4Addr, req: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 1, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&req[..28]);
        let c = checksum(&[&body]);
        body[2..4].copy_from_slice(&c.to_be_bytes());
        let to = Ipv4Addr::new(req[12], req[13], req[14], req[15]);
        let mut p = ipv4_header(router, to, body.len());
        p.extend_from_slice(&body);
        p
    }

    /// What the host behind the gateway does: swap the addresses, turn the request into a reply,
    /// fix the checksums.
    pub(crate) fn answer(req: &[u8], v6: bool) -> Vec<u8> {
        let mut p = req.to_vec();
        if v6 {
            let (s, d) = (p[8..24].to_vec(), p[24..40].to_vec());
            p[8..24].copy_from_slice(&d);
            p[24..40].copy_from_slice(&s);
            p[40] = ICMP6_ECHO_REPLY;
            p[42..44].copy_from_slice(&[0, 0]);
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap());
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap());
            let c = checksum(&[&pseudo_v6(src, dst, p.len() - 40), &p[40..]]);
            p[42..44].copy_from_slice(&c.to_be_bytes());
        } else {
            let (s, d) = (p[12..16].to_vec(), p[16..20].to_vec());
            p[12..16].copy_from_slice(&d);
            p[16..20].copy_from_slice(&s);
            p[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&[&p[..20]]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p[20] = ICMP_ECHO_REPLY;
            p[22..24].copy_from_slice(&[0, 0]);
            let c = checksum(&[&p[20..]]);
            p[22..24].copy_from_slice(&c.to_be_bytes());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::answer::answer;
    use super::*;

    fn echo(src: &str, dst: &str) -> Echo {
        Echo {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ident: 0x1234,
            seq: 7,
            token: *b"abcdefgh",
        }
    }

    #[test]
    fn ipv4_request_is_valid_and_its_reply_is_recognised() {
        let e = echo("192.0.2.77", "10.96.0.1");
        let req = e.request();
        assert_eq!(req.len(), 20 + 8 + 16);
        assert_eq!(&req[..2], &[0x45, 0]);
        assert_eq!(checksum(&[&req[..20]]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&[&req[20..]]), 0, "ICMP checksum");
        assert_eq!((req[9], req[20]), (PROTO_ICMP, ICMP_ECHO));
        assert_eq!(e.check_reply(&answer(&req, false)), Ok(()));
        // The request itself, another sequence, another token, a corrupted byte: not ours.
        assert_eq!(e.check_reply(&req), Err(NotOurs::Other));
        let other = Echo { seq: 8, ..e };
        assert_eq!(other.check_reply(&answer(&req, false)), Err(NotOurs::Other));
        let stale = Echo {
            token: *b"zzzzzzzz",
            ..e
        };
        assert_eq!(stale.check_reply(&answer(&req, false)), Err(NotOurs::Other));
        let mut bad = answer(&req, false);
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            e.check_reply(&bad),
            Err(NotOurs::Malformed("bad ICMP checksum"))
        );
        assert!(matches!(
            e.check_reply(&req[..10]),
            Err(NotOurs::Malformed(_))
        ));
    }

    #[test]
    fn ipv6_request_is_valid_and_its_reply_is_recognised() {
        let e = echo("2001:db8:77::77", "fd00:96::1");
        let req = e.request();
        assert_eq!(req.len(), 40 + 8 + 16);
        assert_eq!(
            (req[0] >> 4, req[6], req[40]),
            (6, PROTO_ICMPV6, ICMP6_ECHO)
        );
        let (s, d) = match (e.src, e.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => (s, d),
            _ => unreachable!(),
        };
        assert_eq!(checksum(&[&pseudo_v6(s, d, 24), &req[40..]]), 0);
        assert_eq!(e.check_reply(&answer(&req, true)), Ok(()));
        assert_eq!(e.check_reply(&req), Err(NotOurs::Other));
    }

    #[test]
    fn icmp_errors_name_the_router_that_sent_them() {
        let e = echo("192.0.2.77", "10.96.0.1");
        // Host unreachable from the gateway 10.96.1.1 to the probe, quoting the request.
        let req = e.request();
        let mut body = vec![3, 1, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&req[..28]);
        let c = checksum(&[&body]);
        body[2..4].copy_from_slice(&c.to_be_bytes());
        let mut p = ipv4_header(
            "10.96.1.1".parse().unwrap(),
            "192.0.2.77".parse().unwrap(),
            body.len(),
        );
        p.extend_from_slice(&body);
        assert_eq!(
            e.check_reply(&p),
            Err(NotOurs::Error {
                from: "10.96.1.1".parse().unwrap(),
                detail: "host unreachable".into()
            })
        );
    }

    #[test]
    fn mixed_families_make_no_packet() {
        assert!(echo("192.0.2.77", "fd00::1").request().is_empty());
    }
}
