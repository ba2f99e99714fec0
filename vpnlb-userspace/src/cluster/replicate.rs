//! Replicated sessions (I/O): what a consistent hash cannot reproduce must exist on every member
//! before it is needed. Each member connects to every peer ([`crate::cluster::peer`] protocol)
//! and sends, first, a bulk copy of its session and session-id tables, then every session and id
//! its data plane reports as they happen; it listens for its peers' streams and writes what they
//! send into its own maps. A peer that falls behind is sent a fresh bulk copy. Counters and the
//! replication lag (event to the peer's acknowledgement of the write) are kept in [`Stats`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};
use vpnlb_common::Session;

use super::peer::{self, Framer, Msg, NONCE, PeerError};
use crate::dataplane::maps::{AyaMaps, MapReader};

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("peer key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("listening on {addr} for peers")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the cluster's peer key: at least 32 bytes, readable by its owner only.
pub fn read_key(path: &std::path::Path) -> Result<Vec<u8>, ReplicationError> {
    use std::os::unix::fs::MetadataExt;
    let err = |reason: String| ReplicationError::Key {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "mode {:04o} lets others read it: chmod 600",
            meta.mode() & 0o7777
        )));
    }
    let key = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if key.len() < peer::MIN_KEY {
        return Err(err(PeerError::ShortKey(key.len()).to_string()));
    }
    Ok(key)
}

/// What replication needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub member: String,
    pub listen: SocketAddr,
    pub key: Arc<Vec<u8>>,
    /// The member's pin dir: its maps are read for bulk copies and written with what peers send.
    pub pin_dir: PathBuf,
}

/// What replication tells the agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// `peer`'s bulk copy has been written here.
    Synced { peer: String },
    /// A connection was refused (wrong key, not a peer, bad frames).
    Refused { from: String, error: String },
    /// The recent replication lag (ms, p50 and p99, to 0.1 ms), published in etcd for
    /// `vpnlb cluster status`.
    Lag { p50_ms: f64, p99_ms: f64 },
}

/// Counters, per peer and in total.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub written: AtomicU64,
    pub write_errors: AtomicU64,
    pub resyncs: AtomicU64,
    pub refused: AtomicU64,
    pub events_dropped: AtomicU64,
    lag_ms: Mutex<VecDeque<f64>>,
    peers: Mutex<BTreeMap<String, PeerStat>>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct PeerStat {
    connected: bool,
    synced: bool,
    sent: u64,
    acked: u64,
    last_error: Option<String>,
}

const LAG_SAMPLES: usize = 4096;

impl Stats {
    fn lag(&self, ms: f64) {
        let mut l = self.lag_ms.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() == LAG_SAMPLES {
            l.pop_front();
        }
        l.push_back(ms);
    }

    fn peer(&self, name: &str, f: impl FnOnce(&mut PeerStat)) {
        let mut p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        f(p.entry(name.to_string()).or_default());
    }

    /// p50 and p99 of the recent replication lags (ms), if any.
    pub fn lag_percentiles(&self) -> Option<(f64, f64)> {
        let mut v: Vec<f64> = self
            .lag_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }

    /// [`Report::Lag`] of the recent lags, rounded to 0.1 ms (so that noise does not republish).
    pub fn lag_report(&self) -> Option<Report> {
        let round = |ms: f64| (ms * 10.0).round() / 10.0;
        self.lag_percentiles().map(|(p50, p99)| Report::Lag {
            p50_ms: round(p50),
            p99_ms: round(p99),
        })
    }

    /// For `vpnlb status`.
    pub fn json(&self) -> Value {
        let lag = self.lag_percentiles();
        json!({
            "sent": self.sent.load(Ordering::Relaxed),
            "received": self.received.load(Ordering::Relaxed),
            "written": self.written.load(Ordering::Relaxed),
            "write_errors": self.write_errors.load(Ordering::Relaxed),
            "resyncs": self.resyncs.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "events_dropped": self.events_dropped.load(Ordering::Relaxed),
            "lag_ms_p50": lag.map(|l| l.0),
            "lag_ms_p99": lag.map(|l| l.1),
            "peers": *self.peers.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

/// A live replicator: set its peers, feed it the data plane's events.
#[derive(Clone)]
pub struct Replicator {
    peers: Arc<watch::Sender<BTreeMap<String, SocketAddr>>>,
    events: broadcast::Sender<(Msg, Instant)>,
    pub stats: Arc<Stats>,
}

/// Events kept for a slow peer before it is resynchronised in bulk.
const EVENT_BACKLOG: usize = 65536;

impl Replicator {
    /// Binds the listener and starts accepting peers' streams; reports on `reports`.
    pub async fn start(
        s: Settings,
        reports: mpsc::Sender<Report>,
    ) -> Result<Replicator, ReplicationError> {
        let listener =
            TcpListener::bind(s.listen)
                .await
                .map_err(|source| ReplicationError::Listen {
                    addr: s.listen,
                    source,
                })?;
        let stats = Arc::new(Stats::default());
        let (peers_tx, peers_rx) = watch::channel(BTreeMap::new());
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let writer = spawn_writer(s.pin_dir.clone(), stats.clone());
        tokio::spawn(accept(listener, s.clone(), writer, reports, stats.clone()));
        tokio::spawn(manage(s, peers_rx, events.clone(), stats.clone()));
        Ok(Replicator {
            peers: Arc::new(peers_tx),
            events,
            stats,
        })
    }

    /// The peers to send to (name -> address); senders start and stop to match.
    pub fn set_peers(&self, peers: BTreeMap<String, SocketAddr>) {
        self.peers.send_replace(peers);
    }

    /// A session or id the data plane reported: sent to every peer.
    pub fn event(&self, m: Msg) {
        // No peer connected: nothing to do (a peer that connects later gets a bulk copy).
        let _ = self.events.send((m, Instant::now()));
    }
}

/// Reads the data plane's `EVENTS` ring buffer (new sessions, learned ids) and hands every event
/// to `r` (until the task is dropped).
pub fn read_events(
    events: aya::maps::RingBuf<aya::maps::MapData>,
    r: Replicator,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    use vpnlb_common::{REPL_KIND_ID, REPL_KIND_SESSION, ReplEvent};
    // SAFETY: the ring buffer owns its fd and neither closes nor replaces it while the AsyncFd
    // owns the ring buffer.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
    }?;
    Ok(tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<ReplEvent>() {
                    continue;
                }
                // SAFETY: the data plane writes whole `ReplEvent`s (repr(C), integers only: every
                // bit pattern is valid); read unaligned from the ring's bytes.
                let e: ReplEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let m = match e.kind {
                    REPL_KIND_SESSION => Msg::Session {
                        key: e.flow,
                        backend_id: e.backend_id,
                        hash: e.hash,
                    },
                    REPL_KIND_ID => Msg::Id {
                        key: e.id,
                        backend_id: e.backend_id,
                    },
                    _ => continue,
                };
                r.event(m);
            }
            guard.clear_ready();
        }
    }))
}

/// Writes what peers send into this member's maps, on its own thread (map updates are
/// syscalls). Each batch is acknowledged once written.
type WriteBatch = (Vec<Msg>, tokio::sync::oneshot::Sender<()>);

fn spawn_writer(pin_dir: PathBuf, stats: Arc<Stats>) -> std::sync::mpsc::Sender<WriteBatch> {
    let (tx, rx) = std::sync::mpsc::channel::<WriteBatch>();
    std::thread::Builder::new()
        .name("vpnlb-repl-write".into())
        .spawn(move || {
            let mut maps: Option<AyaMaps> = None;
            while let Ok((batch, done)) = rx.recv() {
                if maps.is_none() {
                    match AyaMaps::open_pinned(&pin_dir) {
                        Ok(m) => maps = Some(m),
                        Err(e) => {
                            tracing::error!(error = %e, "replication: cannot open the pinned maps");
                            stats
                                .write_errors
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                            let _ = done.send(());
                            continue;
                        }
                    }
                }
                let m = maps.as_mut().expect("opened");
                let now = monotonic_coarse_ns();
                let mut sessions = Vec::new();
                let mut ids = Vec::new();
                for msg in &batch {
                    match msg {
                        Msg::Session {
                            key,
                            backend_id,
                            hash,
                        } => sessions.push((
                            *key,
                            Session {
                                backend_id: *backend_id,
                                hash: *hash,
                                last_seen_ns: now,
                            },
                        )),
                        Msg::Id { key, backend_id } => ids.push((*key, *backend_id)),
                        Msg::Sessions(list) => sessions.extend(list.iter().map(|(k, b, h)| {
                            (
                                *k,
                                Session {
                                    backend_id: *b,
                                    hash: *h,
                                    last_seen_ns: now,
                                },
                            )
                        })),
                        Msg::Ids(list) => ids.extend(list.iter().copied()),
                        _ => {}
                    }
                }
                // Batched writes: a bulk copy of a million sessions is a few hundred syscalls.
                for (n, r) in [
                    (sessions.len(), m.set_sessions(&sessions)),
                    (ids.len(), m.set_session_ids(&ids)),
                ] {
                    match r {
                        Ok(()) => stats.written.fetch_add(n as u64, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(error = %e, "replication: writing a peer's entries failed");
                            stats.write_errors.fetch_add(n as u64, Ordering::Relaxed)
                        }
                    };
                }
                let _ = done.send(());
            }
        })
        .expect("spawn the replication writer");
    tx
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock the data plane stamps sessions with.
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    rand::fill(&mut n);
    n
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads what has arrived (up to 256 KiB at a time: a bulk copy arrives in big reads and is
/// written in big batches).
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    buf.reserve(256 << 10);
    let n = tokio::time::timeout(IO_TIMEOUT, s.read_buf(buf))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    Ok(())
}

async fn accept(
    listener: TcpListener,
    s: Settings,
    writer: std::sync::mpsc::Sender<WriteBatch>,
    reports: mpsc::Sender<Report>,
    stats: Arc<Stats>,
) {
    loop {
        let Ok((conn, from)) = listener.accept().await else {
            continue;
        };
        let (s, writer, reports, stats) =
            (s.clone(), writer.clone(), reports.clone(), stats.clone());
        tokio::spawn(async move {
            if let Err(e) = receive(conn, &s, writer, &reports, &stats).await {
                tracing::debug!(%from, error = %e, "replication stream from a peer ended");
            }
        });
    }
}

/// One peer's stream into this member.
async fn receive(
    mut conn: TcpStream,
    s: &Settings,
    writer: std::sync::mpsc::Sender<WriteBatch>,
    reports: &mpsc::Sender<Report>,
    stats: &Stats,
) -> Result<(), String> {
    let from = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let refuse = |error: String| {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%from, %error, "replication: peer connection refused");
        let _ = reports.try_send(Report::Refused {
            from: from.clone(),
            error: error.clone(),
        });
        error
    };
    let mut buf = Vec::new();
    let (client, nonce_c) = loop {
        match peer::parse_hello(&buf) {
            Ok(Some((name, n, used))) => {
                buf.drain(..used);
                break (name, n);
            }
            Ok(None) => read_more(&mut conn, &mut buf).await?,
            Err(e) => return Err(refuse(e.to_string())),
        }
    };
    let nonce_s = nonce();
    conn.write_all(&peer::hello(&s.member, &nonce_s))
        .await
        .map_err(|e| e.to_string())?;
    while buf.len() < 32 {
        read_more(&mut conn, &mut buf).await?;
    }
    let proof: Vec<u8> = buf.drain(..32).collect();
    if let Err(e) = peer::verify_auth(&s.key, &nonce_c, &nonce_s, &client, &s.member, &proof) {
        return Err(refuse(format!("{client}: {e}")));
    }
    conn.write_all(&[1]).await.map_err(|e| e.to_string())?;
    let mut framer = Framer::new(&peer::session_key(&s.key, &nonce_c, &nonce_s));
    let mut acker = Framer::new(&peer::session_key(&s.key, &nonce_s, &nonce_c));
    loop {
        // Everything whole in the buffer is one batch, written before it is acknowledged.
        let mut batch = Vec::new();
        let mut last = None;
        let mut synced = false;
        loop {
            match framer.decode(&buf) {
                Ok(Some((m, seq, used))) => {
                    buf.drain(..used);
                    last = Some(seq);
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    if let Msg::SyncEnd { .. } = m {
                        synced = true;
                    }
                    batch.push(m);
                }
                Ok(None) => break,
                Err(e) => return Err(refuse(format!("{client}: {e}"))),
            }
        }
        if let Some(seq) = last {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            writer
                .send((batch, done_tx))
                .map_err(|_| "the map writer stopped".to_string())?;
            let _ = done_rx.await;
            let mut out = Vec::new();
            acker.encode(&Msg::Ack { seq }, &mut out);
            conn.write_all(&out).await.map_err(|e| e.to_string())?;
            if synced {
                let _ = reports
                    .send(Report::Synced {
                        peer: client.clone(),
                    })
                    .await;
            }
        }
        read_more(&mut conn, &mut buf).await?;
    }
}

/// Keeps one sender per peer.
async fn manage(
    s: Settings,
    mut peers: watch::Receiver<BTreeMap<String, SocketAddr>>,
    events: broadcast::Sender<(Msg, Instant)>,
    stats: Arc<Stats>,
) {
    let mut running: BTreeMap<String, (SocketAddr, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    loop {
        let want = peers.borrow_and_update().clone();
        running.retain(|name, (addr, task)| {
            let keep = want.get(name) == Some(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, addr) in want {
            if running.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(send_loop(
                s.clone(),
                name.clone(),
                addr,
                events.clone(),
                stats.clone(),
            ));
            running.insert(name, (addr, task));
        }
        if peers.changed().await.is_err() {
            for (_, (_, t)) in running {
                t.abort();
            }
            return;
        }
    }
}

async fn send_loop(
    s: Settings,
    peer: String,
    addr: SocketAddr,
    events: broadcast::Sender<(Msg, Instant)>,
    stats: Arc<Stats>,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        // Subscribe before the bulk copy: what happens during it is sent after it.
        let rx = events.subscribe();
        let r = send(&s, &peer, addr, rx, &stats).await;
        let error = match r {
            Ok(()) => "ended".to_string(),
            Err(e) => e,
        };
        stats.peer(&peer, |p| {
            p.connected = false;
            p.synced = false;
            p.last_error = Some(error.clone());
        });
        tracing::debug!(%peer, %addr, %error, "replication stream to a peer ended; reconnecting");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// One connection to a peer: handshake, bulk copy, then live events.
async fn send(
    s: &Settings,
    peer: &str,
    addr: SocketAddr,
    mut events: broadcast::Receiver<(Msg, Instant)>,
    stats: &Stats,
) -> Result<(), String> {
    let mut conn = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    conn.set_nodelay(true).ok();
    let nonce_c = nonce();
    conn.write_all(&peer::hello(&s.member, &nonce_c))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let (server, nonce_s) = loop {
        match peer::parse_hello(&buf).map_err(|e| e.to_string())? {
            Some((name, n, used)) => {
                buf.drain(..used);
                break (name, n);
            }
            None => read_more(&mut conn, &mut buf).await?,
        }
    };
    if server != peer {
        return Err(format!("{addr} is {server}, not {peer}"));
    }
    let proof = peer::auth(&s.key, &nonce_c, &nonce_s, &s.member, &server);
    conn.write_all(&proof).await.map_err(|e| e.to_string())?;
    while buf.is_empty() {
        read_more(&mut conn, &mut buf).await?;
    }
    if buf.remove(0) != 1 {
        return Err("refused by the peer".into());
    }
    let mut framer = Framer::new(&peer::session_key(&s.key, &nonce_c, &nonce_s));
    let mut acks = Framer::new(&peer::session_key(&s.key, &nonce_s, &nonce_c));
    stats.peer(peer, |p| {
        p.connected = true;
        p.last_error = None;
    });
    let (mut rd, mut wr) = conn.into_split();

    // Bulk copy of what this member has now.
    let dir = s.pin_dir.clone();
    let (sessions, ids) = tokio::task::spawn_blocking(move || {
        let m = AyaMaps::open_pinned(&dir).map_err(|e| e.to_string())?;
        Ok::<_, String>((
            m.sessions().map_err(|e| e.to_string())?,
            m.session_ids().map_err(|e| e.to_string())?,
        ))
    })
    .await
    .map_err(|e| e.to_string())??;
    let mut out = Vec::with_capacity(1 << 20);
    framer.encode(&Msg::SyncBegin, &mut out);
    // Batch frames: one tag per ~88 sessions, not per session.
    for part in sessions.chunks(peer::BATCH_SESSIONS) {
        let list = part
            .iter()
            .map(|(k, s)| (*k, s.backend_id, s.hash))
            .collect();
        framer.encode(&Msg::Sessions(list), &mut out);
        if out.len() > (1 << 20) {
            wr.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
    }
    for part in ids.chunks(peer::BATCH_IDS) {
        framer.encode(&Msg::Ids(part.to_vec()), &mut out);
    }
    framer.encode(
        &Msg::SyncEnd {
            sessions: sessions.len() as u64,
            ids: ids.len() as u64,
        },
        &mut out,
    );
    wr.write_all(&out).await.map_err(|e| e.to_string())?;
    let n = (sessions.len() + ids.len() + 2) as u64;
    stats.sent.fetch_add(n, Ordering::Relaxed);
    stats.peer(peer, |p| p.sent += n);

    // Live events; acknowledgements give the lag.
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let mut rbuf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        tokio::select! {
            ev = events.recv() => {
                let (m, at) = match ev {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        stats.resyncs.fetch_add(1, Ordering::Relaxed);
                        stats.events_dropped.fetch_add(n, Ordering::Relaxed);
                        return Err(format!("{n} events behind: resynchronising in bulk"));
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                let mut out = Vec::new();
                let seq = framer.encode(&m, &mut out);
                wr.write_all(&out).await.map_err(|e| e.to_string())?;
                inflight.push_back((seq, at));
                if inflight.len() > EVENT_BACKLOG {
                    inflight.pop_front();
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
                stats.peer(peer, |p| p.sent += 1);
            }
            _ = ping.tick() => {
                let mut out = Vec::new();
                framer.encode(&Msg::Ping { t: 0 }, &mut out);
                wr.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            n = rd.read(&mut chunk) => {
                let n = n.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed by the peer".into());
                }
                rbuf.extend_from_slice(&chunk[..n]);
                while let Some((m, _, used)) = acks.decode(&rbuf).map_err(|e| e.to_string())? {
                    rbuf.drain(..used);
                    if let Msg::Ack { seq } = m {
                        let now = Instant::now();
                        while inflight.front().is_some_and(|(s, _)| *s <= seq) {
                            let (_, at) = inflight.pop_front().expect("front");
                            stats.lag(now.duration_since(at).as_secs_f64() * 1e3);
                        }
                        stats.peer(peer, |p| {
                            p.acked = seq;
                            p.synced = true;
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_peer_key_must_be_private_and_long_enough() {
        let dir = std::env::temp_dir().join(format!("vpnlb-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("peer.key");
        std::fs::write(&p, [1u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key(&p).unwrap_err().to_string();
        assert!(
            e.contains("mode 0644 lets others read it: chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key(&p).unwrap(), vec![1u8; 32]);
        std::fs::write(&p, [1u8; 16]).unwrap();
        let e = read_key(&p).unwrap_err().to_string();
        assert!(e.contains("at least 32 bytes (it has 16)"), "{e}");
        assert!(read_key(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
