//! The session stream between members (pure: bytes in, messages out). A member connects to each
//! peer and sends what its data plane learned: sessions and session ids (and a bulk copy of its
//! tables first). The stream is authenticated with the cluster's shared key, not encrypted (it
//! carries what any on-path observer of the VPN traffic sees anyway):
//!
//! ```text
//! client -> server  HELLO     "VPNLBP1\0" | name_len u8 | name | nonce_c [16]
//! server -> client  CHALLENGE "VPNLBP1\0" | name_len u8 | name | nonce_s [16]
//! client -> server  AUTH      HMAC-SHA256(key, "vpnlb peer v1" | nonce_c | nonce_s | client | server)
//! server -> client  OK        0x01
//! then frames, each way:  len u32 (BE, of what follows) | kind u8 | seq u64 (BE) | body |
//!                         tag [16] = HMAC-SHA256(session key, seq | kind | body)[..16]
//! session key = HMAC-SHA256(key, "vpnlb session" | nonce_c | nonce_s)
//! ```
//!
//! Sequence numbers start at 1 in each direction and must increase by one: a replayed,
//! reordered or altered frame fails its tag and ends the connection.

use ring::hmac;
use vpnlb_common::{FlowKey, IdKey};

/// The protocol's magic and version.
pub const MAGIC: &[u8; 8] = b"VPNLBP1\0";
/// Largest frame body accepted.
pub const MAX_BODY: usize = 4096;
pub const NONCE: usize = 16;
pub const TAG: usize = 16;
/// Shortest key accepted.
pub const MIN_KEY: usize = 32;

/// Sessions (or ids) per batch frame of a bulk copy: what fits in [`MAX_BODY`].
pub const BATCH_SESSIONS: usize = (MAX_BODY - 2) / SESSION_LEN;
pub const BATCH_IDS: usize = (MAX_BODY - 2) / ID_LEN;
const SESSION_LEN: usize = 46;
const ID_LEN: usize = 30;

/// One message of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// A session: the flow and its backend (and flow hash).
    Session {
        key: FlowKey,
        backend_id: u32,
        hash: u32,
    },
    /// A learned session id and its backend.
    Id { key: IdKey, backend_id: u32 },
    /// Many sessions in one frame (a bulk copy): (flow, backend id, hash), at most
    /// [`BATCH_SESSIONS`].
    Sessions(Vec<(FlowKey, u32, u32)>),
    /// Many learned ids in one frame, at most [`BATCH_IDS`].
    Ids(Vec<(IdKey, u32)>),
    /// A bulk copy of the sender's tables follows.
    SyncBegin,
    /// The bulk copy is complete (`sessions`, `ids` sent).
    SyncEnd { sessions: u64, ids: u64 },
    /// Keep-alive; `t` is the sender's clock (ns), echoed in the ack.
    Ping { t: u64 },
    /// Receiver -> sender: every frame up to `seq` is applied.
    Ack { seq: u64 },
}

/// Why a peer's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("not a vpnlb peer (bad magic)")]
    Magic,
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("frame of {0} bytes is too long")]
    TooLong(usize),
    #[error("authentication failed: wrong key, or not the peer it claims to be")]
    Auth,
    #[error("frame {got} out of sequence (expected {want})")]
    Sequence { got: u64, want: u64 },
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("the peer key must be at least {MIN_KEY} bytes (it has {0})")]
    ShortKey(usize),
}

/// Equality in time that depends only on the lengths (no early exit on the first difference).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// HELLO or CHALLENGE: magic, name, nonce.
pub fn hello(name: &str, nonce: &[u8; NONCE]) -> Vec<u8> {
    let n = name.as_bytes();
    let n = &n[..n.len().min(255)];
    let mut v = Vec::with_capacity(8 + 1 + n.len() + NONCE);
    v.extend_from_slice(MAGIC);
    v.push(n.len() as u8);
    v.extend_from_slice(n);
    v.extend_from_slice(nonce);
    v
}

/// Parses a HELLO/CHALLENGE from the front of `buf`: (name, nonce, bytes used); `Ok(None)`:
/// more bytes needed.
pub fn parse_hello(buf: &[u8]) -> Result<Option<(String, [u8; NONCE], usize)>, PeerError> {
    if buf.len() < 9 {
        return Ok(None);
    }
    if &buf[..8] != MAGIC {
        return Err(PeerError::Magic);
    }
    let len = buf[8] as usize;
    let need = 9 + len + NONCE;
    if buf.len() < need {
        return Ok(None);
    }
    let name = String::from_utf8_lossy(&buf[9..9 + len]).into_owned();
    let mut nonce = [0u8; NONCE];
    nonce.copy_from_slice(&buf[9 + len..need]);
    Ok(Some((name, nonce, need)))
}

/// The client's proof of the key.
pub fn auth(
    key: &[u8],
    nonce_c: &[u8; NONCE],
    nonce_s: &[u8; NONCE],
    client: &str,
    server: &str,
) -> [u8; 32] {
    hmac(
        key,
        &[
            b"vpnlb peer v1",
            nonce_c,
            nonce_s,
            client.as_bytes(),
            &[0],
            server.as_bytes(),
        ],
    )
}

/// Checks a client's proof (constant time).
pub fn verify_auth(
    key: &[u8],
    nonce_c: &[u8; NONCE],
    nonce_s: &[u8; NONCE],
    client: &str,
    server: &str,
    proof: &[u8],
) -> Result<(), PeerError> {
    let want = auth(key, nonce_c, nonce_s, client, server);
    if ct_eq(&want, proof) {
        Ok(())
    } else {
        Err(PeerError::Auth)
    }
}

/// The key that authenticates the frames of one connection.
pub fn session_key(key: &[u8], nonce_c: &[u8; NONCE], nonce_s: &[u8; NONCE]) -> Vec<u8> {
    hmac(key, &[b"vpnlb session", nonce_c, nonce_s]).to_vec()
}

fn put_words(v: &mut Vec<u8>, w: &[u32; 4]) {
    for x in w {
        v.extend_from_slice(&x.to_le_bytes());
    }
}

fn words(b: &[u8]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, x) in w.iter_mut().enumerate() {
        *x = u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    }
    w
}

fn put_session(v: &mut Vec<u8>, key: &FlowKey, backend_id: u32, hash: u32) {
    put_words(v, &key.src);
    put_words(v, &key.dst);
    v.extend_from_slice(&key.ports.to_le_bytes());
    v.push(key.proto);
    v.push(key.family);
    v.extend_from_slice(&backend_id.to_le_bytes());
    v.extend_from_slice(&hash.to_le_bytes());
}

/// A session entry (`SESSION_LEN` bytes).
fn get_session(b: &[u8]) -> (FlowKey, u32, u32) {
    (
        FlowKey {
            src: words(&b[0..16]),
            dst: words(&b[16..32]),
            ports: u32_at(b, 32),
            proto: b[36],
            family: b[37],
            _pad: [0; 2],
        },
        u32_at(b, 38),
        u32_at(b, 42),
    )
}

fn put_id(v: &mut Vec<u8>, key: &IdKey, backend_id: u32) {
    put_words(v, &key.addr);
    v.extend_from_slice(&key.id.to_le_bytes());
    v.push(key.kind);
    v.push(key.family);
    v.extend_from_slice(&backend_id.to_le_bytes());
}

/// An id entry (`ID_LEN` bytes).
fn get_id(b: &[u8]) -> (IdKey, u32) {
    (
        IdKey {
            addr: words(&b[0..16]),
            id: u64_at(b, 16),
            kind: b[24],
            family: b[25],
            _pad: [0; 6],
        },
        u32_at(b, 26),
    )
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Session { .. } => 1,
            Msg::Id { .. } => 2,
            Msg::SyncBegin => 3,
            Msg::SyncEnd { .. } => 4,
            Msg::Ping { .. } => 5,
            Msg::Ack { .. } => 6,
            Msg::Sessions(_) => 7,
            Msg::Ids(_) => 8,
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Msg::Session {
                key,
                backend_id,
                hash,
            } => put_session(&mut v, key, *backend_id, *hash),
            Msg::Id { key, backend_id } => put_id(&mut v, key, *backend_id),
            Msg::Sessions(list) => {
                v.extend_from_slice(&(list.len() as u16).to_le_bytes());
                for (k, b, h) in list {
                    put_session(&mut v, k, *b, *h);
                }
            }
            Msg::Ids(list) => {
                v.extend_from_slice(&(list.len() as u16).to_le_bytes());
                for (k, b) in list {
                    put_id(&mut v, k, *b);
                }
            }
            Msg::SyncBegin => {}
            Msg::SyncEnd { sessions, ids } => {
                v.extend_from_slice(&sessions.to_le_bytes());
                v.extend_from_slice(&ids.to_le_bytes());
            }
            Msg::Ping { t } => v.extend_from_slice(&t.to_le_bytes()),
            Msg::Ack { seq } => v.extend_from_slice(&seq.to_le_bytes()),
        }
        v
    }

    fn parse(kind: u8, b: &[u8]) -> Result<Msg, PeerError> {
        // A batch: a u16 count, then that many fixed-size entries, exactly.
        let batch = |len: usize, what: &'static str| -> Result<Vec<&[u8]>, PeerError> {
            if b.len() < 2 {
                return Err(PeerError::Truncated(what));
            }
            let n = u16::from_le_bytes([b[0], b[1]]) as usize;
            if b.len() != 2 + n * len {
                return Err(PeerError::Truncated(what));
            }
            Ok(b[2..].chunks(len).collect())
        };
        if kind == 7 {
            return Ok(Msg::Sessions(
                batch(SESSION_LEN, "sessions")?
                    .into_iter()
                    .map(get_session)
                    .collect(),
            ));
        }
        if kind == 8 {
            return Ok(Msg::Ids(
                batch(ID_LEN, "ids")?.into_iter().map(get_id).collect(),
            ));
        }
        let need = |n: usize, what: &'static str| {
            if b.len() == n {
                Ok(())
            } else {
                Err(PeerError::Truncated(what))
            }
        };
        Ok(match kind {
            1 => {
                need(SESSION_LEN, "session")?;
                let (key, backend_id, hash) = get_session(b);
                Msg::Session {
                    key,
                    backend_id,
                    hash,
                }
            }
            2 => {
                need(ID_LEN, "id")?;
                let (key, backend_id) = get_id(b);
                Msg::Id { key, backend_id }
            }
            3 => {
                need(0, "sync begin")?;
                Msg::SyncBegin
            }
            4 => {
                need(16, "sync end")?;
                Msg::SyncEnd {
                    sessions: u64_at(b, 0),
                    ids: u64_at(b, 8),
                }
            }
            5 => {
                need(8, "ping")?;
                Msg::Ping { t: u64_at(b, 0) }
            }
            6 => {
                need(8, "ack")?;
                Msg::Ack { seq: u64_at(b, 0) }
            }
            k => return Err(PeerError::Kind(k)),
        })
    }
}

/// One direction of an authenticated connection: numbers and tags outgoing frames, checks
/// incoming ones.
#[derive(Debug)]
pub struct Framer {
    key: hmac::Key,
    next_out: u64,
    next_in: u64,
}

impl Framer {
    pub fn new(session_key: &[u8]) -> Framer {
        Framer {
            key: hmac::Key::new(hmac::HMAC_SHA256, session_key),
            next_out: 1,
            next_in: 1,
        }
    }

    fn tag(&self, seq: u64, kind: u8, body: &[u8]) -> [u8; TAG] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&seq.to_be_bytes());
        ctx.update(&[kind]);
        ctx.update(body);
        let mut t = [0u8; TAG];
        t.copy_from_slice(&ctx.sign().as_ref()[..TAG]);
        t
    }

    /// Appends `m` as a frame to `out`; returns its sequence number.
    pub fn encode(&mut self, m: &Msg, out: &mut Vec<u8>) -> u64 {
        let seq = self.next_out;
        self.next_out += 1;
        let body = m.body();
        let kind = m.kind();
        let len = 1 + 8 + body.len() + TAG;
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&self.tag(seq, kind, &body));
        seq
    }

    /// Decodes one frame from the front of `buf`: the message, its sequence number and the bytes
    /// used; `Ok(None)`: more bytes needed.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Msg, u64, usize)>, PeerError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len > 1 + 8 + MAX_BODY + TAG {
            return Err(PeerError::TooLong(len));
        }
        if len < 1 + 8 + TAG {
            return Err(PeerError::Truncated("frame"));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let f = &buf[4..4 + len];
        let kind = f[0];
        let seq = u64::from_be_bytes(f[1..9].try_into().expect("8 bytes"));
        let body = &f[9..len - TAG];
        let tag = &f[len - TAG..];
        let want = self.tag(seq, kind, body);
        if !ct_eq(&want, tag) {
            return Err(PeerError::Auth);
        }
        if seq != self.next_in {
            return Err(PeerError::Sequence {
                got: seq,
                want: self.next_in,
            });
        }
        self.next_in += 1;
        Ok(Some((Msg::parse(kind, body)?, seq, 4 + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Msg {
        Msg::Session {
            key: FlowKey {
                src: [0x0700_a8c0, 0, 0, 0],
                dst: [0x0a00_71cb, 0, 0, 0],
                ports: 0x1bca_5c9c,
                proto: 17,
                family: 4,
                _pad: [0; 2],
            },
            backend_id: 3,
            hash: 0xdead_beef,
        }
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        let msgs = [
            session(),
            Msg::Id {
                key: IdKey {
                    addr: [1, 2, 3, 4],
                    id: 0x1122_3344_5566_7788,
                    kind: 3,
                    family: 6,
                    _pad: [0; 6],
                },
                backend_id: 9,
            },
            Msg::SyncBegin,
            Msg::SyncEnd {
                sessions: 5,
                ids: 7,
            },
            Msg::Ping { t: 42 },
            Msg::Ack { seq: 1234 },
            Msg::Sessions(vec![(FlowKey::default(), 1, 2); BATCH_SESSIONS]),
            Msg::Ids(vec![(IdKey::default(), 3); 2]),
        ];
        let k = session_key(&[1; 32], &[2; 16], &[3; 16]);
        let (mut tx, mut rx) = (Framer::new(&k), Framer::new(&k));
        let mut wire = Vec::new();
        for m in &msgs {
            tx.encode(m, &mut wire);
        }
        // Byte by byte: every prefix is "more bytes needed" until a frame is whole.
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for b in wire {
            buf.push(b);
            while let Some((m, seq, used)) = rx.decode(&buf).unwrap() {
                got.push((m, seq));
                buf.drain(..used);
            }
        }
        assert_eq!(
            got.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
            msgs.to_vec()
        );
        assert_eq!(
            got.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn altered_replayed_or_foreign_frames_are_refused() {
        let k = session_key(&[1; 32], &[2; 16], &[3; 16]);
        let mut tx = Framer::new(&k);
        let mut a = Vec::new();
        tx.encode(&session(), &mut a);
        let mut b = Vec::new();
        tx.encode(&Msg::Ping { t: 1 }, &mut b);
        // A flipped bit of the body.
        let mut bad = a.clone();
        bad[20] ^= 1;
        assert_eq!(Framer::new(&k).decode(&bad), Err(PeerError::Auth));
        // Another connection's key.
        let other = session_key(&[1; 32], &[2; 16], &[4; 16]);
        assert_eq!(Framer::new(&other).decode(&a), Err(PeerError::Auth));
        // Out of order, and a replay of a frame already taken.
        let mut rx = Framer::new(&k);
        assert_eq!(rx.decode(&b), Err(PeerError::Sequence { got: 2, want: 1 }));
        let mut rx = Framer::new(&k);
        assert!(rx.decode(&a).unwrap().is_some());
        assert_eq!(rx.decode(&a), Err(PeerError::Sequence { got: 1, want: 2 }));
        // Lengths: too long, too short to hold a tag.
        assert_eq!(
            Framer::new(&k).decode(&u32::MAX.to_be_bytes()),
            Err(PeerError::TooLong(u32::MAX as usize))
        );
        assert_eq!(
            Framer::new(&k).decode(&[0, 0, 0, 3, 1, 2, 3]),
            Err(PeerError::Truncated("frame"))
        );
        // A batch whose count does not match its length (a valid tag over a lying body).
        let mut out = Vec::new();
        let mut tx = Framer::new(&k);
        let mut lie = Vec::new();
        tx.encode(&Msg::Ids(vec![(IdKey::default(), 1)]), &mut lie);
        assert_eq!(Msg::parse(8, &[5, 0]), Err(PeerError::Truncated("ids")));
        out.extend(lie);
        assert!(Framer::new(&k).decode(&out).unwrap().is_some());
    }

    #[test]
    fn the_handshake_proves_the_key_without_sending_it() {
        let key = [9u8; 32];
        let (nc, ns) = ([1u8; 16], [2u8; 16]);
        let h = hello("lb1", &nc);
        assert_eq!(parse_hello(&h[..10]).unwrap(), None, "more bytes needed");
        let (name, nonce, used) = parse_hello(&h).unwrap().unwrap();
        assert_eq!((name.as_str(), nonce, used), ("lb1", nc, h.len()));
        assert_eq!(parse_hello(b"GET / HTTP/1.1\r\n"), Err(PeerError::Magic));
        let proof = auth(&key, &nc, &ns, "lb1", "lb2");
        assert!(verify_auth(&key, &nc, &ns, "lb1", "lb2", &proof).is_ok());
        // Wrong key, another claimed name, a replayed proof under a fresh server nonce.
        assert_eq!(
            verify_auth(&[8u8; 32], &nc, &ns, "lb1", "lb2", &proof),
            Err(PeerError::Auth)
        );
        assert_eq!(
            verify_auth(&key, &nc, &ns, "lb3", "lb2", &proof),
            Err(PeerError::Auth)
        );
        assert_eq!(
            verify_auth(&key, &nc, &[5u8; 16], "lb1", "lb2", &proof),
            Err(PeerError::Auth)
        );
    }
}
