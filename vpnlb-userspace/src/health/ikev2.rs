//! IKEv2 liveness probe (RFC 7296), stateless for the gateway: an IKE_SA_INIT request with a random
//! initiator SPI and nonce whose SA proposes the usual groups (curve25519, ECP, MODP 2048+) while
//! its KE payload is for MODP-1024 (group 2), which none of them is. A live IKE daemon answers
//! INVALID_KE_PAYLOAD naming the group it wants and keeps no state (RFC 7296 1.2); one under
//! half-open pressure answers COOKIE first, one without a matching proposal NO_PROPOSAL_CHOSEN. Any
//! such valid IKE response to our SPI is a success and the detail names it. Port 4500 (NAT-T) gets
//! the 4-byte non-ESP marker.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use super::probe::{ProbeOk, io_detail, sock_addr, udp_socket};
use super::spec::{CheckSpec, CheckTarget};

/// IKE header length.
pub const HEADER_LEN: usize = 28;
/// Exchange type IKE_SA_INIT.
pub const IKE_SA_INIT: u8 = 34;
/// Header flags.
pub const FLAG_INITIATOR: u8 = 0x08;
pub const FLAG_RESPONSE: u8 = 0x20;
/// Payload types.
pub const PT_NONE: u8 = 0;
pub const PT_SA: u8 = 33;
pub const PT_KE: u8 = 34;
pub const PT_NONCE: u8 = 40;
pub const PT_NOTIFY: u8 = 41;
/// Notify message types.
pub const INVALID_KE_PAYLOAD: u16 = 17;
pub const NO_PROPOSAL_CHOSEN: u16 = 14;
pub const COOKIE: u16 = 16390;

/// Transform types and the ids proposed.
const T_ENCR: u8 = 1;
const T_PRF: u8 = 2;
const T_INTEG: u8 = 3;
const T_DH: u8 = 4;
const ENCR_AES_CBC: u16 = 12;
const ENCR_AES_GCM_16: u16 = 20;
const PRFS: [u16; 4] = [5, 6, 7, 2]; // HMAC-SHA2-256, -384, -512, HMAC-SHA1
const INTEGS: [u16; 4] = [12, 13, 14, 2]; // HMAC-SHA2-256-128, -384-192, -512-256, HMAC-SHA1-96
/// Groups proposed: curve25519, ECP-256/384/521, MODP-2048/3072/4096.
pub const PROPOSED_GROUPS: [u16; 7] = [31, 19, 20, 21, 14, 15, 16];
/// The group of the KE payload: MODP-1024, deliberately not proposed.
pub const PROBE_KE_GROUP: u16 = 2;
const PROBE_KE_LEN: usize = 128;
const NONCE_LEN: usize = 32;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 65_535;

/// An IKEv2 probe's failure (its text is the result's detail) or a bad spec.
#[derive(Debug, thiserror::Error)]
pub enum Ikev2Error {
    #[error("not an ikev2 check")]
    NotIkev2,
    #[error("no response after {ms}ms")]
    NoResponse { ms: u128 },
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("wrong SPI {got:016x} (sent {sent:016x})")]
    WrongSpi { got: u64, sent: u64 },
    #[error("socket: {}", io_detail(.error))]
    Socket { error: io::Error },
    #[error("{}", io_detail(.error))]
    Io { error: io::Error },
}

/// One generic payload header + body appended to `out`; returns nothing, the caller chains types.
fn payload(out: &mut Vec<u8>, next: u8, body: &[u8]) {
    out.push(next);
    out.push(0); // critical bit clear, reserved
    out.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
    out.extend_from_slice(body);
}

/// A transform substructure; `last` ends the proposal's list.
fn transform(out: &mut Vec<u8>, last: bool, ttype: u8, id: u16, key_bits: Option<u16>) {
    let len: u16 = if key_bits.is_some() { 12 } else { 8 };
    out.push(if last { 0 } else { 3 });
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(ttype);
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    if let Some(bits) = key_bits {
        // Key Length attribute, TV format (AF bit set), type 14.
        out.extend_from_slice(&0x800e_u16.to_be_bytes());
        out.extend_from_slice(&bits.to_be_bytes());
    }
}

/// A proposal substructure for protocol IKE (no SPI).
fn proposal(out: &mut Vec<u8>, last: bool, num: u8, transforms: &[(u8, u16, Option<u16>)]) {
    let mut body = Vec::new();
    for (i, (t, id, bits)) in transforms.iter().enumerate() {
        transform(&mut body, i + 1 == transforms.len(), *t, *id, *bits);
    }
    out.push(if last { 0 } else { 2 });
    out.push(0);
    out.extend_from_slice(&((body.len() + 8) as u16).to_be_bytes());
    out.push(num);
    out.push(1); // protocol IKE
    out.push(0); // SPI size
    out.push(transforms.len() as u8);
    out.extend_from_slice(&body);
}

/// The SA payload body: proposal 1 = AES-CBC + integrity, proposal 2 = AES-GCM (AEAD, no
/// integrity transform), both with every PRF and group in [`PROPOSED_GROUPS`].
fn sa_body() -> Vec<u8> {
    let common = |list: &mut Vec<(u8, u16, Option<u16>)>| {
        list.extend(PRFS.iter().map(|&id| (T_PRF, id, None)));
        list.extend(PROPOSED_GROUPS.iter().map(|&id| (T_DH, id, None)));
    };
    let mut cbc = vec![
        (T_ENCR, ENCR_AES_CBC, Some(128)),
        (T_ENCR, ENCR_AES_CBC, Some(256)),
    ];
    cbc.extend(INTEGS.iter().map(|&id| (T_INTEG, id, None)));
    common(&mut cbc);
    let mut gcm = vec![
        (T_ENCR, ENCR_AES_GCM_16, Some(128)),
        (T_ENCR, ENCR_AES_GCM_16, Some(256)),
    ];
    common(&mut gcm);
    let mut body = Vec::new();
    proposal(&mut body, false, 1, &cbc);
    proposal(&mut body, true, 2, &gcm);
    body
}

/// The probe's IKE_SA_INIT request: header, SA, KE (group [`PROBE_KE_GROUP`], filler data) and
/// Nonce.
pub fn build_sa_init(spi: u64, nonce: &[u8]) -> Vec<u8> {
    let mut payloads = Vec::new();
    payload(&mut payloads, PT_KE, &sa_body());
    let mut ke = Vec::with_capacity(4 + PROBE_KE_LEN);
    ke.extend_from_slice(&PROBE_KE_GROUP.to_be_bytes());
    ke.extend_from_slice(&[0, 0]);
    // Any value: the responder rejects the group before looking at it. Not 0 or 1 (RFC 6989).
    ke.extend(std::iter::repeat_n(0x5a, PROBE_KE_LEN));
    payload(&mut payloads, PT_NONCE, &ke);
    payload(&mut payloads, PT_NONE, nonce);
    let mut msg = Vec::with_capacity(HEADER_LEN + payloads.len());
    msg.extend_from_slice(&spi.to_be_bytes());
    msg.extend_from_slice(&0u64.to_be_bytes());
    msg.push(PT_SA);
    msg.push(0x20); // version 2.0
    msg.push(IKE_SA_INIT);
    msg.push(FLAG_INITIATOR);
    msg.extend_from_slice(&0u32.to_be_bytes()); // message id
    msg.extend_from_slice(&((HEADER_LEN + payloads.len()) as u32).to_be_bytes());
    msg.extend_from_slice(&payloads);
    msg
}

/// A notify payload of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub kind: u16,
    pub data: Vec<u8>,
}

/// A parsed IKE_SA_INIT response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub responder_spi: u64,
    /// Payload types in order.
    pub payloads: Vec<u8>,
    pub notifies: Vec<Notify>,
}

/// What the gateway answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// INVALID_KE_PAYLOAD with the group the responder wants.
    InvalidKe { group: u16 },
    /// COOKIE (the responder wants proof of the return path first).
    Cookie,
    /// Another error notify (NO_PROPOSAL_CHOSEN, ...): alive, but not for our proposal.
    Error { kind: u16 },
    /// A full IKE_SA_INIT response (SA, KE, Nonce): the gateway keeps a half-open SA.
    SaInit,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::InvalidKe { group } => write!(f, "INVALID_KE_PAYLOAD (group {group})"),
            Answer::Cookie => f.write_str("COOKIE"),
            Answer::Error { kind } => f.write_str(&notify_name(*kind)),
            Answer::SaInit => f.write_str("IKE_SA_INIT response"),
        }
    }
}

/// The RFC 7296 name of an error notify type, or `notify N`.
pub fn notify_name(kind: u16) -> String {
    let name = match kind {
        1 => "UNSUPPORTED_CRITICAL_PAYLOAD",
        4 => "INVALID_IKE_SPI",
        5 => "INVALID_MAJOR_VERSION",
        7 => "INVALID_SYNTAX",
        9 => "INVALID_MESSAGE_ID",
        11 => "INVALID_SPI",
        NO_PROPOSAL_CHOSEN => "NO_PROPOSAL_CHOSEN",
        INVALID_KE_PAYLOAD => "INVALID_KE_PAYLOAD",
        24 => "AUTHENTICATION_FAILED",
        43 => "TEMPORARY_FAILURE",
        COOKIE => "COOKIE",
        _ => return format!("notify {kind}"),
    };
    name.to_string()
}

fn malformed(why: impl Into<String>) -> Ikev2Error {
    Ikev2Error::Malformed(why.into())
}

/// Parses `msg` as the response to our IKE_SA_INIT with initiator SPI `spi`: header checks (SPI,
/// version, exchange, flags, message id, length) and the payload chain.
pub fn parse_response(msg: &[u8], spi: u64) -> Result<Response, Ikev2Error> {
    if msg.len() < HEADER_LEN {
        return Err(malformed(format!("{} bytes", msg.len())));
    }
    let u64_at = |o: usize| u64::from_be_bytes(msg[o..o + 8].try_into().expect("8 bytes"));
    let got = u64_at(0);
    if got != spi {
        return Err(Ikev2Error::WrongSpi { got, sent: spi });
    }
    let (first, version, exchange, flags) = (msg[16], msg[17], msg[18], msg[19]);
    if version >> 4 != 2 {
        return Err(malformed(format!(
            "version {}.{}",
            version >> 4,
            version & 15
        )));
    }
    if exchange != IKE_SA_INIT {
        return Err(malformed(format!("exchange type {exchange}")));
    }
    if flags & FLAG_RESPONSE == 0 || flags & FLAG_INITIATOR != 0 {
        return Err(malformed(format!("flags {flags:#04x}")));
    }
    let msg_id = u32::from_be_bytes(msg[20..24].try_into().expect("4 bytes"));
    if msg_id != 0 {
        return Err(malformed(format!("message id {msg_id}")));
    }
    let len = u32::from_be_bytes(msg[24..28].try_into().expect("4 bytes")) as usize;
    if len != msg.len() {
        return Err(malformed(format!(
            "length field {len}, datagram {}",
            msg.len()
        )));
    }
    let mut resp = Response {
        responder_spi: u64_at(8),
        payloads: Vec::new(),
        notifies: Vec::new(),
    };
    let (mut next, mut at) = (first, HEADER_LEN);
    while next != PT_NONE {
        if at + 4 > msg.len() {
            return Err(malformed(format!("payload {next} past the end")));
        }
        let plen = u16::from_be_bytes([msg[at + 2], msg[at + 3]]) as usize;
        if plen < 4 || at + plen > msg.len() {
            return Err(malformed(format!("payload {next} length {plen}")));
        }
        let body = &msg[at + 4..at + plen];
        if next == PT_NOTIFY {
            // Protocol id, SPI size, type, SPI, data.
            if body.len() < 4 || body.len() < 4 + body[1] as usize {
                return Err(malformed(format!("notify of {} bytes", body.len())));
            }
            resp.notifies.push(Notify {
                kind: u16::from_be_bytes([body[2], body[3]]),
                data: body[4 + body[1] as usize..].to_vec(),
            });
        }
        resp.payloads.push(next);
        next = msg[at];
        at += plen;
    }
    if at != msg.len() {
        return Err(malformed(format!(
            "{} bytes after the last payload",
            msg.len() - at
        )));
    }
    Ok(resp)
}

impl Response {
    /// What the response means for the probe: an error notify first, then COOKIE, then a full
    /// SA_INIT response.
    pub fn answer(&self) -> Result<Answer, Ikev2Error> {
        if let Some(n) = self.notifies.iter().find(|n| n.kind < 16384) {
            if n.kind == INVALID_KE_PAYLOAD {
                let group = <[u8; 2]>::try_from(n.data.as_slice())
                    .map_err(|_| malformed("INVALID_KE_PAYLOAD without a group"))?;
                return Ok(Answer::InvalidKe {
                    group: u16::from_be_bytes(group),
                });
            }
            return Ok(Answer::Error { kind: n.kind });
        }
        if self.notifies.iter().any(|n| n.kind == COOKIE) {
            return Ok(Answer::Cookie);
        }
        if [PT_SA, PT_KE, PT_NONCE]
            .iter()
            .all(|p| self.payloads.contains(p))
        {
            return Ok(Answer::SaInit);
        }
        Err(malformed("neither an error, a cookie nor SA, KE and Nonce"))
    }
}

/// A prepared IKEv2 check.
#[derive(Debug, Clone)]
pub struct Ikev2Probe {
    target: CheckTarget,
    port: u16,
}

impl Ikev2Probe {
    pub fn new(spec: &CheckSpec, target: &CheckTarget) -> Result<Ikev2Probe, Ikev2Error> {
        let CheckSpec::Ikev2 { port, .. } = spec else {
            return Err(Ikev2Error::NotIkev2);
        };
        Ok(Ikev2Probe {
            target: target.clone(),
            port: *port,
        })
    }

    /// One request bounded by `timeout`; the detail of a success is e.g.
    /// `INVALID_KE_PAYLOAD (group 31) 0.4ms`.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, Ikev2Error> {
        tokio::time::timeout(timeout, self.exchange())
            .await
            .map_err(|_| Ikev2Error::NoResponse {
                ms: timeout.as_millis(),
            })?
    }

    async fn exchange(&self) -> Result<ProbeOk, Ikev2Error> {
        let addr = sock_addr(&self.target, self.port);
        let sock = udp_socket(&self.target, addr).map_err(|error| Ikev2Error::Socket { error })?;
        let io = |error| Ikev2Error::Io { error };
        sock.connect(addr).await.map_err(io)?;
        // A zero initiator SPI is invalid.
        let spi = rand::random::<u64>().max(1);
        let nonce: [u8; NONCE_LEN] = rand::random();
        let marker: &[u8] = if self.port == 4500 { &[0; 4] } else { &[] };
        let mut req = marker.to_vec();
        req.extend_from_slice(&build_sa_init(spi, &nonce));
        let start = Instant::now();
        sock.send(&req).await.map_err(io)?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = sock.recv(&mut buf).await.map_err(io)?;
        let latency = start.elapsed();
        let msg = buf[..n]
            .strip_prefix(marker)
            .ok_or_else(|| malformed("no non-ESP marker"))?;
        let answer = parse_response(msg, spi)?.answer()?;
        Ok(ProbeOk::new(latency, &answer.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::CheckTiming;
    use tokio::net::UdpSocket;

    /// Walks a message's payload chain: (type, offset, length) of each payload.
    fn chain(msg: &[u8]) -> Vec<(u8, usize, usize)> {
        let mut out = Vec::new();
        let (mut next, mut at) = (msg[16], HEADER_LEN);
        while next != PT_NONE {
            let len = u16::from_be_bytes([msg[at + 2], msg[at + 3]]) as usize;
            out.push((next, at, len));
            next = msg[at];
            at += len;
        }
        assert_eq!(at, msg.len(), "chain ends at the end");
        out
    }

    #[test]
    fn sa_init_encoding() {
        let nonce = [7u8; 32];
        let msg = build_sa_init(0x0102_0304_0506_0708, &nonce);
        // Header: SPIs, first payload SA, version 2.0, IKE_SA_INIT, initiator, id 0, length.
        assert_eq!(&msg[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&msg[8..16], &[0; 8]);
        assert_eq!(&msg[16..20], &[PT_SA, 0x20, 34, 0x08]);
        assert_eq!(&msg[20..24], &[0; 4]);
        assert_eq!(
            u32::from_be_bytes(msg[24..28].try_into().unwrap()) as usize,
            msg.len()
        );
        let c = chain(&msg);
        let types: Vec<u8> = c.iter().map(|p| p.0).collect();
        assert_eq!(types, vec![PT_SA, PT_KE, PT_NONCE]);
        // SA: two proposals (CBC: 2 ENCR + 4 INTEG + 4 PRF + 7 DH = 17 transforms; GCM: 13).
        let (_, sa, sa_len) = c[0];
        let p1 = sa + 4;
        let p1_len = u16::from_be_bytes([msg[p1 + 2], msg[p1 + 3]]) as usize;
        assert_eq!(msg[p1], 2, "more proposals follow");
        assert_eq!(&msg[p1 + 4..p1 + 8], &[1, 1, 0, 17]);
        assert_eq!(p1_len, 8 + 2 * 12 + 15 * 8);
        let p2 = p1 + p1_len;
        let p2_len = u16::from_be_bytes([msg[p2 + 2], msg[p2 + 3]]) as usize;
        assert_eq!(msg[p2], 0, "last proposal");
        assert_eq!(&msg[p2 + 4..p2 + 8], &[2, 1, 0, 13]);
        assert_eq!(p2 + p2_len, sa + sa_len, "proposals fill the SA payload");
        // Transforms chain: 3 (more) ... 0 (last), lengths add up, key length attributes.
        let mut t = p1 + 8;
        let mut dh = Vec::new();
        for i in 0..17 {
            let tlen = u16::from_be_bytes([msg[t + 2], msg[t + 3]]) as usize;
            assert_eq!(msg[t], if i == 16 { 0 } else { 3 });
            if msg[t + 4] == T_ENCR {
                assert_eq!(tlen, 12);
                assert_eq!(&msg[t + 8..t + 10], &[0x80, 0x0e]);
            } else {
                assert_eq!(tlen, 8);
            }
            if msg[t + 4] == T_DH {
                dh.push(u16::from_be_bytes([msg[t + 6], msg[t + 7]]));
            }
            t += tlen;
        }
        assert_eq!(t, p2);
        assert_eq!(dh, PROPOSED_GROUPS);
        // KE: group 2, not proposed, 128 bytes of data.
        let (_, ke, ke_len) = c[1];
        assert_eq!(ke_len, 4 + 4 + 128);
        assert_eq!(&msg[ke + 4..ke + 8], &[0, 2, 0, 0]);
        assert!(!PROPOSED_GROUPS.contains(&PROBE_KE_GROUP));
        // Nonce.
        let (_, n, n_len) = c[2];
        assert_eq!(n_len, 36);
        assert_eq!(&msg[n + 4..n + 36], &nonce);
        assert_eq!(msg.len(), 28 + sa_len + 136 + 36);
    }

    /// charon 5.9's answer to our request, as sent (INVALID_KE_PAYLOAD asking for group 31):
    /// header with responder SPI 0, one notify payload with a 2-byte group.
    fn invalid_ke(spi: u64, group: u16) -> Vec<u8> {
        let mut m = spi.to_be_bytes().to_vec();
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&[PT_NOTIFY, 0x20, 34, 0x20, 0, 0, 0, 0, 0, 0, 0, 38]);
        m.extend_from_slice(&[0, 0, 0, 10, 0, 0, 0, 17]);
        m.extend_from_slice(&group.to_be_bytes());
        m
    }

    #[test]
    fn parses_invalid_ke_payload() {
        let spi = 0x1122_3344_5566_7788;
        let r = parse_response(&invalid_ke(spi, 31), spi).expect("valid");
        assert_eq!(r.payloads, vec![PT_NOTIFY]);
        assert_eq!(
            r.notifies,
            vec![Notify {
                kind: INVALID_KE_PAYLOAD,
                data: vec![0, 31]
            }]
        );
        let a = r.answer().expect("answer");
        assert_eq!(a, Answer::InvalidKe { group: 31 });
        assert_eq!(a.to_string(), "INVALID_KE_PAYLOAD (group 31)");
    }

    #[test]
    fn other_answers() {
        let spi = 9;
        // COOKIE (status notify) and NO_PROPOSAL_CHOSEN (error, no data).
        let mut cookie = invalid_ke(spi, 0);
        cookie.truncate(28);
        cookie.extend_from_slice(&[0, 0, 0, 28, 0, 0, 0x40, 0x06]);
        cookie.extend_from_slice(&[0xab; 20]);
        let len = cookie.len() as u32;
        cookie[24..28].copy_from_slice(&len.to_be_bytes());
        let r = parse_response(&cookie, spi).expect("cookie");
        assert_eq!(r.answer().expect("answer"), Answer::Cookie);
        let mut npc = invalid_ke(spi, 0);
        npc.truncate(28);
        npc.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 14]);
        npc[27] = 36;
        let a = parse_response(&npc, spi).expect("npc").answer().expect("a");
        assert_eq!(a.to_string(), "NO_PROPOSAL_CHOSEN");
        // A full response: SA, KE, Nonce (bodies not interpreted).
        let mut full = invalid_ke(spi, 0);
        full.truncate(28);
        full[16] = PT_SA;
        full.extend_from_slice(&[PT_KE, 0, 0, 6, 1, 2]);
        full.extend_from_slice(&[PT_NONCE, 0, 0, 4]);
        full.extend_from_slice(&[PT_NONE, 0, 0, 5, 9]);
        full[27] = 43;
        let a = parse_response(&full, spi)
            .expect("full")
            .answer()
            .expect("a");
        assert_eq!(a, Answer::SaInit);
    }

    #[test]
    fn malformed_and_foreign_responses_are_rejected() {
        let spi = 0x42;
        let good = invalid_ke(spi, 31);
        let err = |m: &[u8]| parse_response(m, spi).expect_err("bad").to_string();
        assert_eq!(
            err(&invalid_ke(0x43, 31)),
            "wrong SPI 0000000000000043 (sent 0000000000000042)"
        );
        assert_eq!(err(&good[..20]), "malformed response: 20 bytes");
        let mut m = good.clone();
        m[17] = 0x10;
        assert_eq!(err(&m), "malformed response: version 1.0");
        let mut m = good.clone();
        m[18] = 35;
        assert_eq!(err(&m), "malformed response: exchange type 35");
        let mut m = good.clone();
        m[19] = 0x08;
        assert_eq!(err(&m), "malformed response: flags 0x08");
        let mut m = good.clone();
        m[23] = 1;
        assert_eq!(err(&m), "malformed response: message id 1");
        assert_eq!(
            err(&good[..36]),
            "malformed response: length field 38, datagram 36"
        );
        let mut m = good.clone();
        m[31] = 40; // notify length past the end
        assert_eq!(err(&m), "malformed response: payload 41 length 40");
        let mut m = good.clone();
        m[31] = 3;
        assert_eq!(err(&m), "malformed response: payload 41 length 3");
        let mut m = good.clone();
        m[28] = PT_NONCE; // chain continues past the end
        assert_eq!(err(&m), "malformed response: payload 40 past the end");
        // A notify-less, SA-less answer means nothing.
        let mut m = good.clone();
        m[16] = PT_NONCE;
        let r = parse_response(&m, spi).expect("parses");
        assert!(
            r.answer()
                .expect_err("meaningless")
                .to_string()
                .contains("neither")
        );
        // INVALID_KE_PAYLOAD must carry a group.
        let mut m = good.clone();
        m.truncate(36);
        m[27] = 36;
        m[31] = 8;
        let r = parse_response(&m, spi).expect("parses");
        assert!(
            r.answer()
                .expect_err("no group")
                .to_string()
                .contains("without a group")
        );
    }

    fn spec(port: u16) -> CheckSpec {
        CheckSpec::Ikev2 {
            port,
            timing: CheckTiming {
                interval_ms: 1000,
                timeout_ms: 300,
                ..CheckTiming::default()
            },
        }
    }

    fn target() -> CheckTarget {
        CheckTarget {
            backend_id: 1,
            check_index: 0,
            generation: 0,
            addr: "127.0.0.1".parse().expect("addr"),
            source: None,
            interface: None,
        }
    }

    /// A loopback responder that answers each request with INVALID_KE_PAYLOAD (to the request's
    /// SPI, or to another one when `wrong_spi`).
    async fn responder(wrong_spi: bool) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = s.local_addr().expect("addr").port();
        let h = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).await.expect("recv");
            let spi = u64::from_be_bytes(buf[..8].try_into().expect("spi"));
            let spi = if wrong_spi { spi ^ 1 } else { spi };
            s.send_to(&invalid_ke(spi, 31), from).await.expect("send");
            buf[..n].to_vec()
        });
        (port, h)
    }

    #[tokio::test]
    async fn probe_against_a_loopback_responder() {
        let (port, h) = responder(false).await;
        let p = Ikev2Probe::new(&spec(port), &target()).expect("probe");
        let ok = p.probe(Duration::from_millis(300)).await.expect("answer");
        assert!(
            ok.detail.starts_with("INVALID_KE_PAYLOAD (group 31) "),
            "{}",
            ok.detail
        );
        let req = h.await.expect("responder");
        assert_eq!(chain(&req).len(), 3);
        assert_ne!(&req[..8], &[0; 8]);

        let (port, h) = responder(true).await;
        let p = Ikev2Probe::new(&spec(port), &target()).expect("probe");
        let e = p.probe(Duration::from_millis(300)).await.expect_err("spi");
        assert!(e.to_string().starts_with("wrong SPI"), "{e}");
        h.await.expect("responder");

        // Bound but silent.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().expect("addr").port();
        let p = Ikev2Probe::new(&spec(port), &target()).expect("probe");
        let e = p
            .probe(Duration::from_millis(200))
            .await
            .expect_err("silent");
        assert_eq!(e.to_string(), "no response after 200ms");
    }
}
