//! ICMP / ICMPv6 echo probe, built to scale to thousands of checks.
//!
//! Design: every raw ICMP socket gets a copy of every ICMP packet the host receives (`raw_v4_input`
//! clones the packet for each matching socket, net/ipv4/raw.c; `ipv6_raw_deliver` in net/ipv6/raw.c
//! likewise), so one raw socket per check costs O(checks²) copies and wake-ups. Instead all checks of one family, source
//! address and interface share one socket (per network namespace): the probe registers
//! `sequence -> waiting probe` in a table, sends its echo request with the socket's identifier and
//! a random 8-byte token, and a receive thread matches each echo reply (identifier, sequence, source
//! address, token) to its probe. The kernel drops what is not for us before it is queued: an
//! `ICMP_FILTER` / `ICMP6_FILTER` type filter (echo reply and the unreachable / time-exceeded errors
//! only) and a classic BPF filter that keeps echo replies only when they carry our identifier.
//! Errors quoting one of our requests (host unreachable from a router, ...) fail that probe at once.
//!
//! Raw sockets need CAP_NET_RAW, which the agent has (it loads XDP). Without it the probe falls back
//! to the unprivileged "ping" sockets (SOCK_DGRAM / IPPROTO_ICMP, the kernel assigns and filters the
//! identifier), which work only when `net.ipv4.ping_group_range` includes our group; its default
//! "1 0" excludes everyone, hence raw sockets first. Sockets are keyed by
//! (netns, family, kind, source, interface): checks that bind to a source address or an interface
//! share a socket bound the same way (`bind`, SO_BINDTODEVICE).
//!
//! The receive side is a plain thread blocking in `recvfrom`, not a task: it wakes only for our
//! replies, needs no runtime (so probes from any runtime can share it) and stamps replies as they
//! arrive. It stops when the last check using the socket is dropped.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tokio::sync::oneshot;

use super::probe::{ProbeOk, bind_socket, io_detail, sock_addr};
use super::spec::{CheckSpec, CheckTarget};

/// Bytes after the 8-byte ICMP header: an 8-byte random token, then a fixed marker.
const PAYLOAD_LEN: usize = 16;
const MARKER: &[u8; 8] = b"vpnlb-hc";
/// How long the receive thread blocks before it looks at its stop flag again (a fallback: closing
/// the socket's read side wakes it at once).
const RX_POLL: Duration = Duration::from_secs(1);

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_ECHO: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;

/// `SOL_RAW` / `ICMP_FILTER` (linux/icmp.h) and `ICMP6_FILTER` (linux/icmpv6.h).
const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
const ICMP6_FILTER: libc::c_int = 1;

/// An ICMP probe's failure (its text is the result's detail) or a socket that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum IcmpError {
    #[error("not an icmp check")]
    NotIcmp,
    #[error(
        "opening {kind} icmp socket: {} (needs CAP_NET_RAW, or net.ipv4.ping_group_range for ping sockets)",
        io_detail(.error)
    )]
    Open {
        kind: &'static str,
        error: io::Error,
    },
    #[error("preparing icmp socket: {}", io_detail(.error))]
    Setup { error: io::Error },
    #[error("no reply after {ms}ms")]
    NoReply { ms: u128 },
    #[error("{detail}")]
    Unreachable { detail: String },
    #[error("send: {}", io_detail(.error))]
    Send { error: io::Error },
    #[error("too many probes in flight")]
    Busy,
    #[error("icmp receiver stopped")]
    Stopped,
}

/// Which kind of socket carries the echo requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IcmpSocketKind {
    /// SOCK_RAW: needs CAP_NET_RAW; the identifier is ours and filtered by BPF.
    Raw,
    /// SOCK_DGRAM "ping" socket: needs `net.ipv4.ping_group_range`; the kernel owns the identifier.
    Ping,
}

/// Counters of one shared ICMP socket. With the kernel filters in place nearly every received
/// datagram is a reply to one of our probes: `received - matched` counts late replies (after the
/// probe's timeout) and the rare error that quotes someone else's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpSocketStats {
    /// Echo identifier of the socket (raw sockets only; ping sockets get the kernel's).
    pub ident: u16,
    pub received: u64,
    pub matched: u64,
    pub in_flight: usize,
}

/// A prepared ICMP echo check holding its shared socket.
pub struct IcmpProbe {
    target: CheckTarget,
    dst: SocketAddr,
    socket: Arc<SharedSocket>,
}

impl std::fmt::Debug for IcmpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcmpProbe")
            .field("target", &self.target)
            .field("kind", &self.socket.inner.kind)
            .field("ident", &self.socket.inner.ident)
            .finish()
    }
}

impl IcmpProbe {
    /// Uses (or opens) the shared raw socket for the target's family, source and interface in the
    /// calling thread's network namespace, falling back to a ping socket without CAP_NET_RAW.
    pub fn new(target: &CheckTarget) -> Result<IcmpProbe, IcmpError> {
        match IcmpProbe::with_kind(target, IcmpSocketKind::Raw) {
            Err(IcmpError::Open { error, .. })
                if matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                IcmpProbe::with_kind(target, IcmpSocketKind::Ping).map_err(|e| match e {
                    // Report the raw socket's refusal: that is the one to fix.
                    IcmpError::Open { .. } => IcmpError::Open { kind: "raw", error },
                    e => e,
                })
            }
            r => r,
        }
    }

    /// Like [`IcmpProbe::new`] with a given socket kind (no fallback).
    pub fn with_kind(target: &CheckTarget, kind: IcmpSocketKind) -> Result<IcmpProbe, IcmpError> {
        Ok(IcmpProbe {
            target: target.clone(),
            dst: sock_addr(target, 0),
            socket: SharedSocket::get(target, kind)?,
        })
    }

    pub fn socket_kind(&self) -> IcmpSocketKind {
        self.socket.inner.kind
    }

    /// Counters of the shared socket this check uses.
    pub fn socket_stats(&self) -> IcmpSocketStats {
        let i = &self.socket.inner;
        IcmpSocketStats {
            ident: i.ident,
            received: i.received.load(Ordering::Relaxed),
            matched: i.matched.load(Ordering::Relaxed),
            in_flight: i.table().len(),
        }
    }

    /// Sends one echo request and waits for its reply; the detail of a success is
    /// `echo reply 0.3ms` (measured from the send to the receive thread's wake-up).
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, IcmpError> {
        let inner = &self.socket.inner;
        let token: [u8; 8] = rand::random();
        let (seq, rx) = inner.register(self.target.addr, token)?;
        // Unregisters on every exit path, including the runner dropping this future.
        let _pending = PendingGuard { inner, seq };
        let packet = echo_request(inner.v6, inner.ident, seq, &token);
        let sent = Instant::now();
        inner
            .sock
            .send_to_with_flags(&packet, &self.dst.into(), libc::MSG_DONTWAIT)
            .map_err(|error| IcmpError::Send { error })?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(IcmpError::NoReply {
                ms: timeout.as_millis(),
            }),
            Ok(Err(_)) => Err(IcmpError::Stopped),
            Ok(Ok(Reply::Echo { at })) => Ok(ProbeOk::new(
                at.saturating_duration_since(sent),
                "echo reply",
            )),
            Ok(Ok(Reply::Error { detail })) => Err(IcmpError::Unreachable { detail }),
        }
    }
}

/// Probes an `icmp` spec once with its `timeout_ms`.
pub async fn probe_once(spec: &CheckSpec, target: &CheckTarget) -> Result<ProbeOk, IcmpError> {
    let CheckSpec::Icmp { timing } = spec else {
        return Err(IcmpError::NotIcmp);
    };
    IcmpProbe::new(target)?
        .probe(Duration::from_millis(timing.timeout_ms))
        .await
}

/// What the receive thread hands a waiting probe.
#[derive(Debug)]
enum Reply {
    Echo { at: Instant },
    Error { detail: String },
}

struct Pending {
    dst: IpAddr,
    token: [u8; 8],
    tx: oneshot::Sender<Reply>,
}

/// The part of a shared socket its receive thread holds.
struct Inner {
    sock: Socket,
    v6: bool,
    kind: IcmpSocketKind,
    /// Echo identifier (raw sockets; a ping socket's is set by the kernel and not checked here).
    ident: u16,
    next_seq: AtomicU16,
    pending: Mutex<HashMap<u16, Pending>>,
    stop: AtomicBool,
    /// Datagrams the kernel queued to us, and those that completed a probe.
    received: AtomicU64,
    matched: AtomicU64,
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, HashMap<u16, Pending>> {
        // A panic while holding the lock leaves a consistent map: keep using it.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(
        &self,
        dst: IpAddr,
        token: [u8; 8],
    ) -> Result<(u16, oneshot::Receiver<Reply>), IcmpError> {
        let mut table = self.table();
        for _ in 0..=u16::MAX {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            if let std::collections::hash_map::Entry::Vacant(slot) = table.entry(seq) {
                let (tx, rx) = oneshot::channel();
                slot.insert(Pending { dst, token, tx });
                return Ok((seq, rx));
            }
        }
        Err(IcmpError::Busy)
    }

    /// Matches one received datagram to its probe.
    fn dispatch(&self, data: &[u8], from: Option<IpAddr>, at: Instant) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let with_ip_header = !self.v6 && self.kind == IcmpSocketKind::Raw;
        let check_ident = self.kind == IcmpSocketKind::Raw;
        match parse(self.v6, with_ip_header, data, from) {
            Parsed::Echo {
                id,
                seq,
                src,
                payload,
            } => {
                if check_ident && id != self.ident {
                    return;
                }
                let mut table = self.table();
                let matches = table
                    .get(&seq)
                    .is_some_and(|p| same_ip(p.dst, src) && payload_matches(payload, &p.token));
                if matches && let Some(p) = table.remove(&seq) {
                    self.matched.fetch_add(1, Ordering::Relaxed);
                    let _ = p.tx.send(Reply::Echo { at });
                }
            }
            Parsed::Error {
                id,
                seq,
                dst,
                detail,
            } => {
                if check_ident && id != self.ident {
                    return;
                }
                let mut table = self.table();
                let matches = table.get(&seq).is_some_and(|p| same_ip(p.dst, dst));
                if matches && let Some(p) = table.remove(&seq) {
                    self.matched.fetch_add(1, Ordering::Relaxed);
                    let _ = p.tx.send(Reply::Error { detail });
                }
            }
            Parsed::Other => {}
        }
    }
}

struct PendingGuard<'a> {
    inner: &'a Inner,
    seq: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.inner.table().remove(&self.seq);
    }
}

/// One socket shared by every check with the same [`PoolKey`]; stops its thread when dropped.
struct SharedSocket {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    /// (st_dev, st_ino) of the calling thread's network namespace.
    netns: (u64, u64),
    v6: bool,
    kind: IcmpSocketKind,
    source: Option<IpAddr>,
    interface: Option<String>,
}

static POOL: LazyLock<Mutex<HashMap<PoolKey, Weak<SharedSocket>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl SharedSocket {
    fn get(target: &CheckTarget, kind: IcmpSocketKind) -> Result<Arc<SharedSocket>, IcmpError> {
        let key = PoolKey {
            netns: netns_id(),
            v6: target.addr.is_ipv6(),
            kind,
            source: target.source,
            interface: target.interface.clone(),
        };
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = pool.get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        pool.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(SharedSocket::open(target, kind)?);
        pool.insert(key, Arc::downgrade(&s));
        Ok(s)
    }

    fn open(target: &CheckTarget, kind: IcmpSocketKind) -> Result<SharedSocket, IcmpError> {
        let v6 = target.addr.is_ipv6();
        let (domain, proto) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let (ty, kind_name) = match kind {
            IcmpSocketKind::Raw => (Type::RAW, "raw"),
            IcmpSocketKind::Ping => (Type::DGRAM, "ping"),
        };
        let sock = Socket::new(domain, ty, Some(proto)).map_err(|error| IcmpError::Open {
            kind: kind_name,
            error,
        })?;
        let ident: u16 = rand::random();
        let setup = |error| IcmpError::Setup { error };
        bind_socket(&sock, target).map_err(setup)?;
        sock.set_read_timeout(Some(RX_POLL)).map_err(setup)?;
        // Room for a burst of replies; root may exceed net.core.rmem_max.
        if set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 4 << 20).is_err() {
            let _ = sock.set_recv_buffer_size(4 << 20);
        }
        if kind == IcmpSocketKind::Raw {
            if v6 {
                set_icmp6_filter(&sock).map_err(setup)?;
                sock.attach_filter(&bpf_v6(ident)).map_err(setup)?;
            } else {
                let pass = (1u32 << ICMP_ECHO_REPLY)
                    | (1 << ICMP_DEST_UNREACH)
                    | (1 << ICMP_TIME_EXCEEDED);
                set_int(&sock, SOL_RAW, ICMP_FILTER, !pass as libc::c_int).map_err(setup)?;
                sock.attach_filter(&bpf_v4(ident)).map_err(setup)?;
            }
        }
        let inner = Arc::new(Inner {
            sock,
            v6,
            kind,
            ident,
            next_seq: AtomicU16::new(rand::random()),
            pending: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            received: AtomicU64::new(0),
            matched: AtomicU64::new(0),
        });
        let rx = inner.clone();
        std::thread::Builder::new()
            .name("vpnlb-icmp-rx".into())
            .spawn(move || receive(&rx))
            .map_err(setup)?;
        Ok(SharedSocket { inner })
    }
}

impl Drop for SharedSocket {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        // Wakes the receive thread out of recvfrom (it returns 0); it then sees `stop`.
        let _ = self.inner.sock.shutdown(std::net::Shutdown::Read);
    }
}

/// The receive thread: one `recvfrom` per reply, then a table look-up.
fn receive(inner: &Inner) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    while !inner.stop.load(Ordering::Relaxed) {
        match inner.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let at = Instant::now();
                // SAFETY: recvfrom initialized the first `n` bytes of `buf` (n <= buf.len()).
                let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                inner.dispatch(data, from.as_socket().map(|a| a.ip()), at);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // Transient (e.g. ENOBUFS); do not spin.
                tracing::warn!(error = %e, "icmp receive");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A received datagram, as far as the probes care.
#[derive(Debug, PartialEq, Eq)]
enum Parsed<'a> {
    Echo {
        id: u16,
        seq: u16,
        src: IpAddr,
        payload: &'a [u8],
    },
    /// An ICMP error quoting one of our echo requests to `dst`.
    Error {
        id: u16,
        seq: u16,
        dst: IpAddr,
        detail: String,
    },
    Other,
}

/// Parses a datagram from an ICMP socket. IPv4 raw sockets deliver the IP header; ping sockets
/// and IPv6 sockets start at the ICMP header, and `from` is the sender.
fn parse(v6: bool, with_ip_header: bool, data: &[u8], from: Option<IpAddr>) -> Parsed<'_> {
    let (icmp, src) = if with_ip_header {
        let Some(ihl) = ipv4_header_len(data) else {
            return Parsed::Other;
        };
        if data[9] != libc::IPPROTO_ICMP as u8 {
            return Parsed::Other;
        }
        let src = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
        (&data[ihl..], IpAddr::V4(src))
    } else {
        match from {
            Some(src) => (data, src),
            None => return Parsed::Other,
        }
    };
    if icmp.len() < 8 {
        return Parsed::Other;
    }
    let (ty, code) = (icmp[0], icmp[1]);
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    let echo_reply = if v6 {
        ICMP6_ECHO_REPLY
    } else {
        ICMP_ECHO_REPLY
    };
    if ty == echo_reply && code == 0 {
        return Parsed::Echo {
            id,
            seq,
            src,
            payload: &icmp[8..],
        };
    }
    let detail = match error_detail(v6, ty, code) {
        Some(d) => format!("{d} from {src}"),
        None => return Parsed::Other,
    };
    let quoted = &icmp[8..];
    let inner = if v6 {
        quoted_echo_v6(quoted)
    } else {
        quoted_echo_v4(quoted)
    };
    match inner {
        Some((dst, id, seq)) => Parsed::Error {
            id,
            seq,
            dst,
            detail,
        },
        None => Parsed::Other,
    }
}

fn ipv4_header_len(data: &[u8]) -> Option<usize> {
    let first = *data.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && ihl >= 20 && data.len() >= ihl).then_some(ihl)
}

/// The destination, identifier and sequence of the echo request an ICMPv4 error quotes.
fn quoted_echo_v4(quoted: &[u8]) -> Option<(IpAddr, u16, u16)> {
    let ihl = ipv4_header_len(quoted)?;
    if quoted[9] != libc::IPPROTO_ICMP as u8 || quoted.len() < ihl + 8 || quoted[ihl] != ICMP_ECHO {
        return None;
    }
    let dst = Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]);
    let e = &quoted[ihl..];
    Some((
        IpAddr::V4(dst),
        u16::from_be_bytes([e[4], e[5]]),
        u16::from_be_bytes([e[6], e[7]]),
    ))
}

/// The same for ICMPv6 (a request without extension headers, as we send them).
fn quoted_echo_v6(quoted: &[u8]) -> Option<(IpAddr, u16, u16)> {
    if quoted.len() < 48 || quoted[0] >> 4 != 6 || quoted[6] != libc::IPPROTO_ICMPV6 as u8 {
        return None;
    }
    let e = &quoted[40..];
    if e[0] != ICMP6_ECHO {
        return None;
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&quoted[24..40]);
    Some((
        IpAddr::V6(Ipv6Addr::from(dst)),
        u16::from_be_bytes([e[4], e[5]]),
        u16::from_be_bytes([e[6], e[7]]),
    ))
}

fn error_detail(v6: bool, ty: u8, code: u8) -> Option<String> {
    let s = match (v6, ty, code) {
        (false, ICMP_DEST_UNREACH, 0) => "network unreachable".into(),
        (false, ICMP_DEST_UNREACH, 1) => "host unreachable".into(),
        (false, ICMP_DEST_UNREACH, 9 | 10 | 13) => "administratively prohibited".into(),
        (false, ICMP_DEST_UNREACH, c) => format!("destination unreachable (code {c})"),
        (false, ICMP_TIME_EXCEEDED, _) => "ttl exceeded".into(),
        (true, ICMP6_DEST_UNREACH, 0) => "no route to destination".into(),
        (true, ICMP6_DEST_UNREACH, 1) => "administratively prohibited".into(),
        (true, ICMP6_DEST_UNREACH, 3) => "address unreachable".into(),
        (true, ICMP6_DEST_UNREACH, c) => format!("destination unreachable (code {c})"),
        (true, ICMP6_TIME_EXCEEDED, _) => "hop limit exceeded".into(),
        _ => return None,
    };
    Some(s)
}

fn payload_matches(payload: &[u8], token: &[u8; 8]) -> bool {
    payload.len() >= PAYLOAD_LEN && payload[..8] == token[..] && payload[8..16] == MARKER[..]
}

/// IPv4-mapped and plain forms of one address compare equal.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// An echo request. The ICMPv4 checksum is ours to fill; the kernel fills ICMPv6's (raw ICMPv6
/// sockets always checksum at offset 2) and a ping socket's.
fn echo_request(v6: bool, ident: u16, seq: u16, token: &[u8; 8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + PAYLOAD_LEN);
    p.extend_from_slice(&[if v6 { ICMP6_ECHO } else { ICMP_ECHO }, 0, 0, 0]);
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(token);
    p.extend_from_slice(MARKER);
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD_B_ABS: u16 = 0x30;
const BPF_LD_H_ABS: u16 = 0x28;
const BPF_LD_B_IND: u16 = 0x50;
const BPF_LD_H_IND: u16 = 0x48;
const BPF_LDX_B_MSH: u16 = 0xb1;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;

/// IPv4 raw sockets see the packet from the IP header (`raw_rcv` pushes the data back to the network
/// header before the socket filter runs, net/ipv4/raw.c): keep echo replies with our identifier and
/// the error types (ICMP_FILTER already dropped the rest).
fn bpf_v4(ident: u16) -> [SockFilter; 9] {
    [
        SockFilter::new(BPF_LDX_B_MSH, 0, 0, 0), // 0: x = IP header length
        SockFilter::new(BPF_LD_B_IND, 0, 0, 0),  // 1: a = icmp type
        SockFilter::new(BPF_JEQ_K, 0, 2, 0),     // 2: echo reply ? 3 : 5
        SockFilter::new(BPF_LD_H_IND, 0, 0, 4),  // 3: a = identifier
        SockFilter::new(BPF_JEQ_K, 2, 3, ident as u32), // 4: ours ? 7 : 8
        SockFilter::new(BPF_JEQ_K, 1, 0, 3),     // 5: unreachable ? 7 : 6
        SockFilter::new(BPF_JEQ_K, 0, 1, 11),    // 6: time exceeded ? 7 : 8
        SockFilter::new(BPF_RET_K, 0, 0, u32::MAX), // 7: accept
        SockFilter::new(BPF_RET_K, 0, 0, 0),     // 8: drop
    ]
}

/// IPv6 raw sockets see the packet from the ICMPv6 header (`ip6_protocol_deliver_rcu` pulls the
/// IPv6 headers before raw delivery, net/ipv6/ip6_input.c).
fn bpf_v6(ident: u16) -> [SockFilter; 8] {
    [
        SockFilter::new(BPF_LD_B_ABS, 0, 0, 0), // 0: a = icmpv6 type
        SockFilter::new(BPF_JEQ_K, 0, 2, 129),  // 1: echo reply ? 2 : 4
        SockFilter::new(BPF_LD_H_ABS, 0, 0, 4), // 2: a = identifier
        SockFilter::new(BPF_JEQ_K, 2, 3, ident as u32), // 3: ours ? 6 : 7
        SockFilter::new(BPF_JEQ_K, 1, 0, 1),    // 4: unreachable ? 6 : 5
        SockFilter::new(BPF_JEQ_K, 0, 1, 3),    // 5: time exceeded ? 6 : 7
        SockFilter::new(BPF_RET_K, 0, 0, u32::MAX), // 6: accept
        SockFilter::new(BPF_RET_K, 0, 0, 0),    // 7: drop
    ]
}

fn set_int(sock: &Socket, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// ICMP6_FILTER: a set bit blocks that type. Pass echo replies and the two error types.
fn set_icmp6_filter(sock: &Socket) -> io::Result<()> {
    let mut filter = [u32::MAX; 8];
    for ty in [ICMP6_ECHO_REPLY, ICMP6_DEST_UNREACH, ICMP6_TIME_EXCEEDED] {
        filter[usize::from(ty >> 5)] &= !(1 << (ty & 31));
    }
    // SAFETY: passes a pointer to a live [u32; 8] (struct icmp6_filter) and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMP6_FILTER,
            filter.as_ptr().cast(),
            size_of::<[u32; 8]>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Identifies the calling thread's network namespace (sockets are per namespace).
fn netns_id() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], icmp: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let len = (p.len() + icmp.len()) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p.extend_from_slice(icmp);
        p
    }

    #[test]
    fn checksum_matches_rfc1071_and_verifies() {
        // RFC 1071's example words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2 -> checksum 0x220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
        let p = echo_request(false, 0x1234, 7, &[1; 8]);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!(p.len(), 8 + PAYLOAD_LEN);
        assert_eq!(&p[..2], &[ICMP_ECHO, 0]);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        let p6 = echo_request(true, 1, 2, &[1; 8]);
        assert_eq!(&p6[..4], &[ICMP6_ECHO, 0, 0, 0]);
    }

    #[test]
    fn parses_echo_replies() {
        let token = [9u8; 8];
        let mut reply = echo_request(false, 0xbeef, 42, &token);
        reply[0] = ICMP_ECHO_REPLY;
        let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], &reply);
        let Parsed::Echo {
            id,
            seq,
            src,
            payload,
        } = parse(false, true, &pkt, None)
        else {
            panic!("not an echo reply");
        };
        assert_eq!((id, seq), (0xbeef, 42));
        assert_eq!(src, IpAddr::from([10, 0, 0, 2]));
        assert!(payload_matches(payload, &token));
        assert!(!payload_matches(payload, &[8u8; 8]));
        // A ping socket delivers the ICMP header only; the sender comes from recvfrom.
        let from: IpAddr = "10.0.0.3".parse().expect("addr");
        assert!(matches!(
            parse(false, false, &reply, Some(from)),
            Parsed::Echo { src, .. } if src == from
        ));
        let mut reply6 = echo_request(true, 5, 6, &token);
        reply6[0] = ICMP6_ECHO_REPLY;
        let from6: IpAddr = "fd00::2".parse().expect("addr");
        assert!(matches!(
            parse(true, false, &reply6, Some(from6)),
            Parsed::Echo { id: 5, seq: 6, .. }
        ));
        // Requests, truncated and non-ICMP packets are not replies.
        let req = ipv4_packet(
            [10, 0, 0, 2],
            [10, 0, 0, 1],
            &echo_request(false, 1, 1, &token),
        );
        assert_eq!(parse(false, true, &req, None), Parsed::Other);
        assert_eq!(parse(false, true, &pkt[..24], None), Parsed::Other);
        let mut udp = pkt.clone();
        udp[9] = 17;
        assert_eq!(parse(false, true, &udp, None), Parsed::Other);
        assert_eq!(parse(false, true, &[], None), Parsed::Other);
    }

    #[test]
    fn parses_errors_quoting_our_requests() {
        let token = [3u8; 8];
        let request = ipv4_packet(
            [10, 0, 0, 1],
            [10, 9, 9, 9],
            &echo_request(false, 77, 5, &token),
        );
        let mut err = vec![ICMP_DEST_UNREACH, 1, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&request[..28]);
        let pkt = ipv4_packet([10, 0, 0, 254], [10, 0, 0, 1], &err);
        assert_eq!(
            parse(false, true, &pkt, None),
            Parsed::Error {
                id: 77,
                seq: 5,
                dst: IpAddr::from([10, 9, 9, 9]),
                detail: "host unreachable from 10.0.0.254".into(),
            }
        );
        // ICMPv6 address unreachable quoting an echo request to fd00::9.
        let mut inner6 = vec![0x60, 0, 0, 0, 0, 24, 58, 64];
        inner6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("a").octets());
        inner6.extend_from_slice(&"fd00::9".parse::<Ipv6Addr>().expect("a").octets());
        inner6.extend_from_slice(&echo_request(true, 8, 9, &token));
        let mut err6 = vec![ICMP6_DEST_UNREACH, 3, 0, 0, 0, 0, 0, 0];
        err6.extend_from_slice(&inner6);
        let router: IpAddr = "fd00::fe".parse().expect("addr");
        assert_eq!(
            parse(true, false, &err6, Some(router)),
            Parsed::Error {
                id: 8,
                seq: 9,
                dst: "fd00::9".parse().expect("addr"),
                detail: "address unreachable from fd00::fe".into(),
            }
        );
    }

    #[test]
    fn demux_delivers_only_matching_replies() {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("any socket");
        let inner = Inner {
            sock,
            v6: false,
            kind: IcmpSocketKind::Raw,
            ident: 0x4242,
            next_seq: AtomicU16::new(u16::MAX),
            pending: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            received: AtomicU64::new(0),
            matched: AtomicU64::new(0),
        };
        let dst: IpAddr = "10.0.0.2".parse().expect("addr");
        let token = [5u8; 8];
        let (seq_a, mut rx_a) = inner.register(dst, token).expect("register");
        let (seq_b, mut rx_b) = inner.register(dst, token).expect("register");
        assert_eq!((seq_a, seq_b), (u16::MAX, 0), "sequence numbers wrap");
        let reply = |id: u16, seq: u16, src: [u8; 4], token: &[u8; 8]| {
            let mut r = echo_request(false, id, seq, token);
            r[0] = ICMP_ECHO_REPLY;
            ipv4_packet(src, [10, 0, 0, 1], &r)
        };
        let now = Instant::now();
        // Wrong identifier, wrong source, wrong token: all ignored.
        inner.dispatch(&reply(0x4243, seq_a, [10, 0, 0, 2], &token), None, now);
        inner.dispatch(&reply(0x4242, seq_a, [10, 0, 0, 3], &token), None, now);
        inner.dispatch(&reply(0x4242, seq_a, [10, 0, 0, 2], &[6; 8]), None, now);
        assert!(rx_a.try_recv().is_err());
        inner.dispatch(&reply(0x4242, seq_a, [10, 0, 0, 2], &token), None, now);
        assert!(matches!(rx_a.try_recv(), Ok(Reply::Echo { at }) if at == now));
        assert!(rx_b.try_recv().is_err());
        assert_eq!(inner.table().len(), 1);
        drop(PendingGuard {
            inner: &inner,
            seq: seq_b,
        });
        assert!(inner.table().is_empty());
    }

    #[test]
    fn bpf_programs_jump_inside_themselves() {
        // Every conditional jump of both programs lands on an instruction of the program.
        fn check(prog: &[SockFilter]) {
            // SAFETY: SockFilter is repr(transparent) over libc::sock_filter.
            let insns: &[libc::sock_filter] =
                unsafe { std::slice::from_raw_parts(prog.as_ptr().cast(), prog.len()) };
            for (i, f) in insns.iter().enumerate() {
                if f.code == BPF_JEQ_K {
                    assert!(i + 1 + usize::from(f.jt) < insns.len());
                    assert!(i + 1 + usize::from(f.jf) < insns.len());
                }
            }
            assert_eq!(insns.last().map(|f| f.code), Some(BPF_RET_K));
        }
        check(&bpf_v4(1));
        check(&bpf_v6(1));
    }
}
