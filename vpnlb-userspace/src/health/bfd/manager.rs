//! The BFD tokio shell (RFC 5881 single hop): one receive socket per address family on UDP 3784
//! with the TTL/hop-limit 255 check, one send socket per session (TTL 255, source port in
//! 49152-65535), and every session on one dedicated thread driven by one timer heap.
//!
//! The thread runs its own current-thread tokio runtime so BFD timers are not delayed by the rest
//! of the agent, and it is spawned from the thread that calls [`BfdManager::start`]: it lives in
//! that thread's network namespace, and so do all the sockets it opens.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use thiserror::Error;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::packet::{ControlPacket, Diagnostic, State};
use super::session::{Event, ParamsError, Session, SessionParams};
use crate::health::spec::{CheckResult, CheckTarget};

/// RFC 5881 single-hop Control packets go to this UDP port.
pub const BFD_PORT: u16 = 3784;
/// RFC 5881 §4: the source port of a session is in this range.
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// AdminDown packets sent when a session's handle is dropped.
const ADMIN_DOWN_SENDS: u8 = 3;
/// Upper bound on the AdminDown farewell, whatever the rate.
const DRAIN_MAX: Duration = Duration::from_millis(3500);
/// A session whose socket could not be opened tries again after this.
const SETUP_RETRY: Duration = Duration::from_secs(2);
/// A report that did not fit in the result channel is retried after this.
const REPORT_RETRY: Duration = Duration::from_millis(10);
/// Receive buffer asked for the shared sockets.
const RX_BUFFER: usize = 1 << 20;
/// IP TOS / IPv6 traffic class of our packets: CS6 (network control), as routers send BFD.
const TOS_CS6: u32 = 0xc0;

/// Errors of [`BfdManager`].
#[derive(Debug, Error)]
pub enum BfdError {
    #[error("bfd: cannot open the receive socket on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("bfd: cannot start the manager thread")]
    Start(#[source] io::Error),
    #[error("bfd: invalid parameters for peer {addr}")]
    Params {
        addr: IpAddr,
        #[source]
        source: ParamsError,
    },
    #[error("bfd: local address {local} and peer {addr} are of different families")]
    Family { addr: IpAddr, local: IpAddr },
    #[error("bfd: link-local peer {addr} needs an interface")]
    NoInterface { addr: IpAddr },
    #[error("bfd: a session to {addr} from {local:?} already exists")]
    Duplicate { addr: IpAddr, local: Option<IpAddr> },
    #[error("bfd: the manager thread has stopped")]
    Stopped,
}

/// A snapshot of one session, for the CLI, metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BfdStatus {
    pub state: State,
    pub local_diag: Diagnostic,
    pub remote_state: State,
    pub remote_diag: Diagnostic,
    pub local_discr: u32,
    pub remote_discr: u32,
    /// Agreed periodic transmit interval before jitter (None: not transmitting).
    pub tx_interval: Option<Duration>,
    /// Time without packets after which the session goes Down (None: peer never heard).
    pub detection_time: Option<Duration>,
    /// Valid packets received and packets sent by this session.
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Source port of our packets (None until the socket is open).
    pub source_port: Option<u16>,
    /// Last socket error (setup or send), if any.
    pub last_error: Option<String>,
}

/// Manager-wide receive counters: packets dropped before reaching a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BfdStats {
    /// TTL / hop limit other than 255 (RFC 5881 §5).
    pub rx_bad_ttl: u64,
    /// Failed [`ControlPacket::decode`].
    pub rx_invalid: u64,
    /// No session matches (discriminator, addresses or interface).
    pub rx_no_session: u64,
}

type Key = (IpAddr, Option<IpAddr>);

#[derive(Default)]
struct Counters {
    bad_ttl: AtomicU64,
    invalid: AtomicU64,
    no_session: AtomicU64,
}

struct Shared {
    next_id: AtomicU64,
    /// (peer, local) of live sessions: duplicates are refused in `add_session`.
    keys: Mutex<HashSet<Key>>,
    counters: Counters,
}

enum Command {
    Add(Box<NewSession>),
    Remove { id: u64 },
}

struct NewSession {
    id: u64,
    params: SessionParams,
    target: CheckTarget,
    tx: mpsc::Sender<CheckResult>,
    status: Arc<Mutex<BfdStatus>>,
}

/// Runs BFD sessions; a cheap [`Clone`] handle. The manager thread ends once every clone and every
/// [`BfdSessionHandle`] is dropped (after the AdminDown farewells).
#[derive(Clone)]
pub struct BfdManager {
    cmd: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

/// A running session; dropping it sends AdminDown a few times and removes the session.
pub struct BfdSessionHandle {
    id: u64,
    key: Key,
    status: Arc<Mutex<BfdStatus>>,
    mgr: BfdManager,
}

impl BfdManager {
    /// Binds UDP 3784 (IPv4, and IPv6 when the kernel has it) in the caller's network namespace
    /// and starts the manager thread. Needs no tokio runtime.
    pub fn start() -> Result<BfdManager, BfdError> {
        Self::start_on_port(BFD_PORT)
    }

    /// [`BfdManager::start`] with another port, both for receiving and as the peers' destination
    /// port: for labs and tests that cannot use 3784.
    pub fn start_on_port(port: u16) -> Result<BfdManager, BfdError> {
        let v4 = open_rx_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        let v6 = match open_rx_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
            Ok(s) => Some(s),
            Err(BfdError::Bind { source, .. })
                if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                tracing::warn!("bfd: no IPv6 in this kernel, IPv4 sessions only");
                None
            }
            Err(e) => return Err(e),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(BfdError::Start)?;
        let (v4, v6) = {
            let _enter = rt.enter();
            (
                register(v4).map_err(BfdError::Start)?,
                v6.map(register).transpose().map_err(BfdError::Start)?,
            )
        };
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            keys: Mutex::new(HashSet::new()),
            counters: Counters::default(),
        });
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let core = Core::new(port, shared.clone());
        std::thread::Builder::new()
            .name("vpnlb-bfd".into())
            .spawn(move || rt.block_on(run(core, v4, v6, cmd_rx)))
            .map_err(BfdError::Start)?;
        Ok(BfdManager { cmd, shared })
    }

    /// Starts a session to `target.addr` (from `target.source` and bound to `target.interface` when
    /// set). Results go to `tx`: one `ok: false` report at once (the session starts Down), then one
    /// per state change, `ok` meaning Up. Socket errors are reported the same way and retried.
    pub fn add_session(
        &self,
        params: SessionParams,
        target: CheckTarget,
        tx: mpsc::Sender<CheckResult>,
    ) -> Result<BfdSessionHandle, BfdError> {
        let addr = target.addr.to_canonical();
        params
            .validate()
            .map_err(|source| BfdError::Params { addr, source })?;
        let local = target.source.map(|s| s.to_canonical());
        if let Some(local) = local
            && local.is_ipv4() != addr.is_ipv4()
        {
            return Err(BfdError::Family { addr, local });
        }
        if let IpAddr::V6(a) = addr
            && a.is_unicast_link_local()
            && target.interface.is_none()
        {
            return Err(BfdError::NoInterface { addr });
        }
        let key = (addr, local);
        if !lock(&self.shared.keys).insert(key) {
            return Err(BfdError::Duplicate { addr, local });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(BfdStatus {
            state: State::Down,
            local_diag: Diagnostic::None,
            remote_state: State::Down,
            remote_diag: Diagnostic::None,
            local_discr: 0,
            remote_discr: 0,
            tx_interval: None,
            detection_time: None,
            rx_packets: 0,
            tx_packets: 0,
            source_port: None,
            last_error: None,
        }));
        let new = NewSession {
            id,
            params,
            target,
            tx,
            status: status.clone(),
        };
        if self.cmd.send(Command::Add(Box::new(new))).is_err() {
            lock(&self.shared.keys).remove(&key);
            return Err(BfdError::Stopped);
        }
        Ok(BfdSessionHandle {
            id,
            key,
            status,
            mgr: self.clone(),
        })
    }

    /// Packets dropped before reaching a session.
    pub fn stats(&self) -> BfdStats {
        let c = &self.shared.counters;
        BfdStats {
            rx_bad_ttl: c.bad_ttl.load(Ordering::Relaxed),
            rx_invalid: c.invalid.load(Ordering::Relaxed),
            rx_no_session: c.no_session.load(Ordering::Relaxed),
        }
    }
}

impl BfdSessionHandle {
    /// The session as of its last packet or timer.
    pub fn status(&self) -> BfdStatus {
        lock(&self.status).clone()
    }
}

impl Drop for BfdSessionHandle {
    fn drop(&mut self) {
        lock(&self.mgr.shared.keys).remove(&self.key);
        let _ = self.mgr.cmd.send(Command::Remove { id: self.id });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The "bfd Up" / "bfd Down (reason)" detail of a report. When the peer signalled the Down, the
/// reason says why: its AdminDown state (FRR sends it with diag 0) or its own diagnostic.
fn state_detail(
    state: State,
    diag: Diagnostic,
    remote_state: State,
    remote_diag: Diagnostic,
) -> String {
    match (state, diag) {
        (State::Up | State::Init, _) | (_, Diagnostic::None) => format!("bfd {state}"),
        (_, Diagnostic::NeighborSignaledSessionDown) if remote_state == State::AdminDown => {
            format!("bfd {state} ({diag}: {})", Diagnostic::AdministrativelyDown)
        }
        (_, Diagnostic::NeighborSignaledSessionDown) if remote_diag != Diagnostic::None => {
            format!("bfd {state} ({diag}: {remote_diag})")
        }
        _ => format!("bfd {state} ({diag})"),
    }
}

// ---- the manager thread ----

async fn run(
    mut core: Core,
    v4: AsyncFd<Socket>,
    v6: Option<AsyncFd<Socket>>,
    mut cmds: mpsc::UnboundedReceiver<Command>,
) {
    let mut buf = [0u8; 256];
    let mut cmds_open = true;
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    // What the sleep is set to (None: must be reset, e.g. after it fired).
    let mut sleep_set: Option<Option<Instant>> = None;
    loop {
        let want = core.next_deadline();
        if sleep_set != Some(want) {
            let at = want.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            sleep.as_mut().reset(tokio::time::Instant::from_std(at));
            sleep_set = Some(want);
        }
        tokio::select! {
            r = v4.readable() => match r {
                Ok(mut guard) => {
                    drain_socket(&mut core, &mut guard, &mut buf);
                }
                Err(e) => tracing::error!("bfd: IPv4 socket: {e}"),
            },
            r = readable(v6.as_ref()) => match r {
                Ok(mut guard) => {
                    drain_socket(&mut core, &mut guard, &mut buf);
                }
                Err(e) => tracing::error!("bfd: IPv6 socket: {e}"),
            },
            c = cmds.recv(), if cmds_open => match c {
                Some(c) => core.command(c, Instant::now()),
                None => cmds_open = false,
            },
            () = &mut sleep => sleep_set = None,
        }
        core.run_timers(Instant::now());
        if !cmds_open && core.sessions.is_empty() {
            return;
        }
    }
}

async fn readable(
    fd: Option<&AsyncFd<Socket>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, Socket>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}

fn drain_socket(
    core: &mut Core,
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Socket>,
    buf: &mut [u8],
) {
    // Bounded so a flood cannot starve the timers.
    for _ in 0..64 {
        match guard.try_io(|fd| recv_with_meta(fd.get_ref().as_raw_fd(), buf)) {
            Ok(Ok(m)) => core.on_datagram(&buf[..m.len], &m, Instant::now()),
            Ok(Err(e)) => {
                tracing::debug!("bfd: recvmsg: {e}");
                return;
            }
            Err(_would_block) => return,
        }
    }
}

/// One session as the manager holds it.
struct Entry {
    id: u64,
    session: Session,
    target: CheckTarget,
    peer: IpAddr,
    local: Option<IpAddr>,
    ifindex: Option<u32>,
    sock: Option<UdpSocket>,
    dest: Option<SocketAddr>,
    setup_retry_at: Option<Instant>,
    last_setup_error: Option<String>,
    /// None once the handle is dropped.
    tx: Option<mpsc::Sender<CheckResult>>,
    pending: VecDeque<CheckResult>,
    report_retry_at: Option<Instant>,
    status: Arc<Mutex<BfdStatus>>,
    rx_packets: u64,
    tx_packets: u64,
    last_error: Option<String>,
    /// AdminDown packets still to send before removal, and the latest removal time.
    draining: Option<(u8, Instant)>,
    /// Time of this session's live entry in the heap.
    armed: Option<Instant>,
}

impl Entry {
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.session.poll_timeout(),
            self.setup_retry_at,
            self.report_retry_at,
            self.draining.map(|d| d.1),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn report(&mut self, ok: bool, detail: String, at: Instant) {
        if self.tx.is_none() {
            return;
        }
        self.pending.push_back(CheckResult {
            backend_id: self.target.backend_id,
            check_index: self.target.check_index,
            generation: self.target.generation,
            ok,
            latency: None,
            phases: Vec::new(),
            detail,
            at,
        });
    }

    fn flush_reports(&mut self, now: Instant) {
        self.report_retry_at = None;
        let Some(tx) = &self.tx else {
            self.pending.clear();
            return;
        };
        while let Some(r) = self.pending.pop_front() {
            match tx.try_send(r) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(r)) => {
                    self.pending.push_front(r);
                    self.report_retry_at = Some(now + REPORT_RETRY);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    self.tx = None;
                    return;
                }
            }
        }
    }

    fn setup(&mut self, port: u16, rng: &mut u64, now: Instant) {
        match open_tx_socket(self.peer, self.local, self.target.interface.as_deref(), rng) {
            Ok((sock, ifindex, src_port)) => {
                self.ifindex = ifindex;
                self.dest = Some(match self.peer {
                    IpAddr::V4(a) => SocketAddr::V4(SocketAddrV4::new(a, port)),
                    IpAddr::V6(a) => {
                        SocketAddr::V6(SocketAddrV6::new(a, port, 0, ifindex.unwrap_or(0)))
                    }
                });
                self.sock = Some(sock);
                self.setup_retry_at = None;
                self.last_setup_error = None;
                lock(&self.status).source_port = Some(src_port);
            }
            Err(e) => {
                let msg = format!("bfd setup failed: {e}");
                if self.last_setup_error.as_ref() != Some(&msg) {
                    tracing::warn!(peer = %self.peer, "{msg}");
                    self.report(false, msg.clone(), now);
                    self.last_setup_error = Some(msg.clone());
                }
                self.last_error = Some(msg);
                self.setup_retry_at = Some(now + SETUP_RETRY);
            }
        }
    }

    fn send(&mut self, p: &ControlPacket) {
        let (Some(sock), Some(dest)) = (&self.sock, self.dest) else {
            return;
        };
        match sock.send_to(&p.encode(), dest) {
            Ok(_) => self.tx_packets += 1,
            Err(e) => {
                tracing::debug!(peer = %self.peer, "bfd send: {e}");
                self.last_error = Some(format!("send: {e}"));
            }
        }
    }

    fn publish(&self) {
        let s = &self.session;
        let mut st = lock(&self.status);
        st.state = s.state();
        st.local_diag = s.local_diag();
        st.remote_state = s.remote_state();
        st.remote_diag = s.remote_diag();
        st.local_discr = s.local_discr();
        st.remote_discr = s.remote_discr();
        st.tx_interval = s.tx_interval();
        st.detection_time = s.detection_time();
        st.rx_packets = self.rx_packets;
        st.tx_packets = self.tx_packets;
        st.last_error.clone_from(&self.last_error);
    }
}

/// Everything the manager thread owns; synchronous, called by `run`.
struct Core {
    port: u16,
    shared: Arc<Shared>,
    sessions: HashMap<u32, Entry, ahash::RandomState>,
    by_addr: HashMap<Key, u32, ahash::RandomState>,
    by_id: HashMap<u64, u32, ahash::RandomState>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    rng: u64,
}

impl Core {
    fn new(port: u16, shared: Arc<Shared>) -> Core {
        Core {
            port,
            shared,
            sessions: HashMap::default(),
            by_addr: HashMap::default(),
            by_id: HashMap::default(),
            heap: BinaryHeap::new(),
            rng: random_seed(),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|r| r.0.0)
    }

    fn command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Add(n) => self.add(*n, now),
            Command::Remove { id } => {
                let Some(discr) = self.by_id.remove(&id) else {
                    return;
                };
                let Some(e) = self.sessions.get_mut(&discr) else {
                    return;
                };
                self.by_addr.remove(&(e.peer, e.local));
                e.tx = None;
                e.pending.clear();
                e.session.admin_down(now);
                e.draining = Some((ADMIN_DOWN_SENDS, now + DRAIN_MAX));
                self.service(discr, now);
            }
        }
    }

    fn add(&mut self, n: NewSession, now: Instant) {
        let discr = loop {
            let d = (splitmix(&mut self.rng) >> 32) as u32;
            if d != 0 && !self.sessions.contains_key(&d) {
                break NonZeroU32::new(d).expect("nonzero");
            }
        };
        let peer = n.target.addr.to_canonical();
        let local = n.target.source.map(|s| s.to_canonical());
        let session = Session::new(n.params, discr, splitmix(&mut self.rng), now);
        let mut e = Entry {
            id: n.id,
            session,
            target: n.target,
            peer,
            local,
            ifindex: None,
            sock: None,
            dest: None,
            setup_retry_at: None,
            last_setup_error: None,
            tx: Some(n.tx),
            pending: VecDeque::new(),
            report_retry_at: None,
            status: n.status,
            rx_packets: 0,
            tx_packets: 0,
            last_error: None,
            draining: None,
            armed: None,
        };
        e.report(false, "bfd Down (session started)".to_string(), now);
        e.setup(self.port, &mut self.rng, now);
        tracing::debug!(peer = %peer, discr = discr.get(), "bfd session added");
        self.by_addr.insert((peer, local), discr.get());
        self.by_id.insert(e.id, discr.get());
        self.sessions.insert(discr.get(), e);
        self.service(discr.get(), now);
    }

    fn on_datagram(&mut self, buf: &[u8], m: &RecvMeta, now: Instant) {
        let c = &self.shared.counters;
        if m.ttl != Some(255) {
            c.bad_ttl.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let p = match ControlPacket::decode(buf) {
            Ok(p) => p,
            Err(e) => {
                tracing::trace!(src = %m.src, "bfd: {e}");
                c.invalid.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let src = m.src.ip().to_canonical();
        let discr = if p.your_discr != 0 {
            Some(p.your_discr)
        } else {
            m.dst
                .and_then(|d| self.by_addr.get(&(src, Some(d.to_canonical()))))
                .or_else(|| self.by_addr.get(&(src, None)))
                .copied()
        };
        let entry = discr.and_then(|d| self.sessions.get_mut(&d)).filter(|e| {
            e.peer == src
                && e.local
                    .is_none_or(|l| Some(l) == m.dst.map(|d| d.to_canonical()))
                && e.ifindex.is_none_or(|i| i == m.ifindex)
        });
        let Some(e) = entry else {
            c.no_session.fetch_add(1, Ordering::Relaxed);
            return;
        };
        e.rx_packets += 1;
        e.session.handle_packet(&p, now);
        let d = e.session.local_discr();
        self.service(d, now);
    }

    /// Pops due heap entries and services their sessions.
    fn run_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, discr))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            let Some(e) = self.sessions.get_mut(&discr) else {
                continue;
            };
            if e.armed != Some(t) {
                continue; // superseded by an earlier entry
            }
            e.armed = None;
            self.service(discr, now);
        }
    }

    /// Runs a session's timers, sends what it has to send, reports its state changes and re-arms
    /// its timer (or removes it when its farewell is over).
    fn service(&mut self, discr: u32, now: Instant) {
        let Some(e) = self.sessions.get_mut(&discr) else {
            return;
        };
        if e.setup_retry_at.is_some_and(|t| t <= now) {
            e.setup(self.port, &mut self.rng, now);
        }
        e.session.handle_timeout(now);
        while let Some(p) = e.session.poll_transmit(now) {
            e.send(&p);
            if let Some((left, _)) = &mut e.draining
                && p.state == State::AdminDown
                && !p.final_
            {
                *left = left.saturating_sub(1);
            }
        }
        while let Some(ev) = e.session.poll_event() {
            let Event::StateChanged {
                from,
                to,
                diag,
                remote_state,
                remote_diag,
                at,
            } = ev;
            tracing::info!(peer = %e.peer, %from, %to, %diag, "bfd state change");
            e.report(
                to == State::Up,
                state_detail(to, diag, remote_state, remote_diag),
                at,
            );
        }
        // Status first, so whoever reacts to a report sees the state it reports.
        e.publish();
        e.flush_reports(now);
        let done = e.draining.is_some_and(|(left, until)| {
            left == 0 || until <= now || e.sock.is_none() || e.session.tx_interval().is_none()
        });
        if done {
            tracing::debug!(peer = %e.peer, discr, "bfd session removed");
            self.sessions.remove(&discr);
            return;
        }
        if let Some(t) = e.next_deadline()
            && e.armed.is_none_or(|a| t < a)
        {
            e.armed = Some(t);
            self.heap.push(Reverse((t, discr)));
        }
    }
}

// ---- sockets ----

fn register(sock: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: a `Socket` owns its fd and returns that same fd from `as_raw_fd` until dropped,
    // and it is only dropped with the `AsyncFd`.
    Ok(unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?)
}

fn open_rx_socket(addr: SocketAddr) -> Result<Socket, BfdError> {
    let err = |source| BfdError::Bind { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
        setsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1).map_err(err)?;
        setsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1).map_err(err)?;
    } else {
        setsockopt_int(&sock, libc::IPPROTO_IP, libc::IP_RECVTTL, 1).map_err(err)?;
        setsockopt_int(&sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1).map_err(err)?;
    }
    // Room for bursts of many sessions' packets (best effort: capped by net.core.rmem_max).
    let _ = sock.set_recv_buffer_size(RX_BUFFER);
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock)
}

/// A session's send socket: TTL / hop limit 255, CS6, optionally bound to a device, bound to the
/// local address (if any) and a free port in 49152-65535. Returns it with the interface's index
/// and the port.
fn open_tx_socket(
    peer: IpAddr,
    local: Option<IpAddr>,
    interface: Option<&str>,
    rng: &mut u64,
) -> io::Result<(UdpSocket, Option<u32>, u16)> {
    let domain = if peer.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let mut ifindex = None;
    if let Some(ifname) = interface {
        sock.bind_device(Some(ifname.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("bind to device {ifname}: {e}")))?;
        ifindex = Some(if_index(ifname)?);
    }
    if peer.is_ipv4() {
        sock.set_ttl_v4(255)?;
        sock.set_tos_v4(TOS_CS6)?;
    } else {
        sock.set_only_v6(true)?;
        sock.set_unicast_hops_v6(255)?;
        sock.set_tclass_v6(TOS_CS6)?;
    }
    sock.set_nonblocking(true)?;
    let ip = local.unwrap_or(match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let scope = match (ip, ifindex) {
        (IpAddr::V6(a), Some(i)) if a.is_unicast_link_local() => i,
        _ => 0,
    };
    let span = (*SOURCE_PORTS.end() - *SOURCE_PORTS.start()) as u64 + 1;
    let mut last = None;
    for _ in 0..64 {
        let port = *SOURCE_PORTS.start() + (splitmix(rng) % span) as u16;
        let addr = match ip {
            IpAddr::V4(a) => SockAddr::from(SocketAddrV4::new(a, port)),
            IpAddr::V6(a) => SockAddr::from(SocketAddrV6::new(a, port, 0, scope)),
        };
        match sock.bind(&addr) {
            Ok(()) => return Ok((sock.into(), ifindex, port)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => {
                return Err(io::Error::new(e.kind(), format!("bind {ip}:{port}: {e}")));
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("interface {name}: {e}")));
    }
    Ok(i)
}

fn setsockopt_int(s: &Socket, level: i32, name: i32, v: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid socket fd and a pointer/length pair describing a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What recvmsg says about a datagram besides its bytes.
struct RecvMeta {
    len: usize,
    src: SocketAddr,
    /// Destination address of the IP header (IP_PKTINFO / IPV6_PKTINFO).
    dst: Option<IpAddr>,
    ifindex: u32,
    /// TTL / hop limit (IP_RECVTTL / IPV6_RECVHOPLIMIT).
    ttl: Option<u8>,
}

fn recv_with_meta(fd: RawFd, buf: &mut [u8]) -> io::Result<RecvMeta> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: every pointer in `msg` refers to a live local buffer of the stated length.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut meta = RecvMeta {
        len: n as usize,
        // SAFETY: the kernel filled `name` with msg_namelen bytes of a sockaddr.
        src: unsafe { sockaddr_to_std(name.as_ptr(), msg.msg_namelen) }
            .ok_or_else(|| io::Error::other("recvmsg: no source address"))?,
        dst: None,
        ifindex: 0,
        ttl: None,
    };
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen; the data
    // of each known (level, type) has the size the kernel documents, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_TTL) => {
                    let v = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    meta.ttl = Some(v as u8);
                }
                (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                    let v = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    meta.ttl = Some(v as u8);
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let p = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    meta.dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr))));
                    meta.ifindex = p.ipi_ifindex as u32;
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let p = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    meta.dst = Some(IpAddr::V6(Ipv6Addr::from(p.ipi6_addr.s6_addr)));
                    meta.ifindex = p.ipi6_ifindex;
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(meta)
}

/// # Safety
/// `sa` points to at least `len` initialized bytes of a sockaddr.
unsafe fn sockaddr_to_std(
    sa: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees `len` valid bytes; the family decides the layout.
    unsafe {
        match (*sa).ss_family as i32 {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
                let a = &*sa.cast::<libc::sockaddr_in>();
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
                let a = &*sa.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

fn random_seed() -> u64 {
    rand::random()
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
