//! Manager tests over loopback (no root): one manager carrying mirrored session pairs
//! (127.0.0.1 -> 127.0.0.2 and back) talks real BFD to itself through its own sockets.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn fast() -> SessionParams {
    SessionParams {
        desired_min_tx: 20 * MS,
        required_min_rx: 20 * MS,
        detect_mult: 3,
        passive: false,
    }
}

fn target(id: u32, addr: &str, source: &str) -> CheckTarget {
    CheckTarget {
        backend_id: id,
        check_index: 0,
        generation: 0,
        addr: addr.parse().unwrap(),
        source: Some(source.parse().unwrap()),
        interface: None,
    }
}

/// A manager on a free high port (3784 may be taken, and tests run in parallel).
fn manager() -> (BfdManager, u16) {
    let base = 20000 + (std::process::id() % 20000) as u16;
    for i in 0..200u16 {
        let port = base.wrapping_add(i * 7) % 40000 + 10000;
        match BfdManager::start_on_port(port) {
            Ok(m) => return (m, port),
            Err(BfdError::Bind { source, .. }) if source.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("start: {e}"),
        }
    }
    panic!("no free port");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `f` every 5 ms until it answers; panics after 30 s (a liveness bound for a loaded
/// machine, not a timing assertion).
fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "condition never met");
        std::thread::sleep(5 * MS);
    }
}

/// Waits for a report with `ok` on `rx`, returning the ones seen on the way.
fn wait_for(
    rt: &tokio::runtime::Runtime,
    rx: &mut mpsc::Receiver<CheckResult>,
    ok: bool,
    timeout: Duration,
) -> Vec<CheckResult> {
    rt.block_on(async {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    let done = r.ok == ok;
                    seen.push(r);
                    if done {
                        return seen;
                    }
                }
                Ok(None) => panic!("channel closed; seen {seen:?}"),
                Err(_) => panic!("no ok={ok} report within {timeout:?}; seen {seen:?}"),
            }
        }
    })
}

#[test]
fn mirrored_sessions_come_up_and_admin_down_on_drop() {
    let (mgr, _port) = manager();
    let rt = rt();
    let (txa, mut rxa) = mpsc::channel(64);
    let (txb, mut rxb) = mpsc::channel(64);
    let a = mgr
        .add_session(fast(), target(1, "127.0.0.2", "127.0.0.1"), txa)
        .unwrap();
    let b = mgr
        .add_session(fast(), target(2, "127.0.0.1", "127.0.0.2"), txb)
        .unwrap();
    let seen = wait_for(&rt, &mut rxa, true, 3 * Duration::from_secs(1));
    assert_eq!(seen[0].detail, "bfd Down (session started)");
    assert!(!seen[0].ok);
    assert_eq!(seen[0].backend_id, 1);
    assert_eq!(seen.last().unwrap().detail, "bfd Up");
    assert!(seen.last().unwrap().latency.is_none());
    wait_for(&rt, &mut rxb, true, Duration::from_secs(3));

    // Poll/Final done: the agreed 20 ms rate (the schedule itself is the session's, tested on a
    // fake clock in session/tests.rs; here: the manager keeps both sessions talking).
    let st = poll(|| Some(a.status()).filter(|s| s.tx_interval == Some(20 * MS)));
    assert_eq!(st.state, State::Up);
    assert_eq!(st.detection_time, Some(60 * MS));
    assert_eq!(st.remote_discr, b.status().local_discr);
    assert!(SOURCE_PORTS.contains(&st.source_port.unwrap()));
    let rx0 = st.rx_packets;
    poll(|| (a.status().rx_packets >= rx0 + 10).then_some(()));
    assert_eq!(mgr.stats(), BfdStats::default());

    // B goes away: it says AdminDown, and A goes Down because of that packet (not because B fell
    // silent, which would read "control detection time expired").
    drop(b);
    let seen = wait_for(&rt, &mut rxa, false, Duration::from_secs(10));
    assert_eq!(
        seen.last().unwrap().detail,
        "bfd Down (neighbor signaled session down: administratively down)"
    );
    // Nothing more from B's channel after its handle is gone (sender dropped by the manager).
    rt.block_on(async {
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            while rxb.recv().await.is_some() {}
        })
        .await;
        assert!(r.is_ok(), "B's report channel closed after its farewell");
    });
    drop(a);
}

#[test]
fn add_session_rejects_bad_input() {
    let (mgr, _) = manager();
    let (tx, _rx) = mpsc::channel(4);
    let bad = SessionParams {
        detect_mult: 0,
        ..fast()
    };
    assert!(matches!(
        mgr.add_session(bad, target(1, "127.0.0.2", "127.0.0.1"), tx.clone()),
        Err(BfdError::Params { .. })
    ));
    assert!(matches!(
        mgr.add_session(fast(), target(1, "::1", "127.0.0.1"), tx.clone()),
        Err(BfdError::Family { .. })
    ));
    let h = mgr
        .add_session(fast(), target(1, "127.0.0.2", "127.0.0.1"), tx.clone())
        .unwrap();
    assert!(matches!(
        mgr.add_session(fast(), target(1, "127.0.0.2", "127.0.0.1"), tx.clone()),
        Err(BfdError::Duplicate { .. })
    ));
    assert!(matches!(
        mgr.add_session(fast(), target(1, "fe80::1", "fe80::2"), tx.clone()),
        Err(BfdError::NoInterface { .. })
    ));
    drop(h);
    // The key is free again once the handle is gone.
    let _h = mgr
        .add_session(fast(), target(1, "127.0.0.2", "127.0.0.1"), tx)
        .unwrap();
}

/// The agent starts the manager from async code: its own runtime must not conflict.
#[tokio::test]
async fn starts_inside_a_runtime() {
    let (mgr, _) = manager();
    let (tx, mut rx) = mpsc::channel(4);
    let passive = SessionParams {
        passive: true,
        ..fast()
    };
    let h = mgr
        .add_session(passive, target(1, "127.0.0.2", "127.0.0.1"), tx)
        .unwrap();
    let r = rx.recv().await.unwrap();
    assert_eq!(r.detail, "bfd Down (session started)");
    drop(h);
    drop(mgr);
}

#[test]
fn setup_errors_are_reported() {
    let (mgr, _) = manager();
    let rt = rt();
    let (tx, mut rx) = mpsc::channel(4);
    // 192.0.2.1 (TEST-NET-1) is not a local address: bind fails.
    let h = mgr
        .add_session(fast(), target(7, "192.0.2.2", "192.0.2.1"), tx)
        .unwrap();
    let r = rt.block_on(async {
        let first = rx.recv().await.unwrap();
        assert_eq!(first.detail, "bfd Down (session started)");
        rx.recv().await.unwrap()
    });
    assert!(!r.ok);
    assert!(
        r.detail.starts_with("bfd setup failed: bind 192.0.2.1:"),
        "{}",
        r.detail
    );
    assert!(h.status().last_error.is_some());
}

#[test]
fn receive_path_drops_bad_ttl_garbage_and_strangers() {
    let (mgr, port) = manager();
    let (tx, _rx) = mpsc::channel(4);
    // Passive: it sends nothing, so the manager does not hear its own packets.
    let passive = SessionParams {
        passive: true,
        ..fast()
    };
    let _h = mgr
        .add_session(passive, target(1, "127.0.0.2", "127.0.0.1"), tx)
        .unwrap();
    let dst = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = UdpSocket::bind("127.0.0.3:0").unwrap();
    let valid = ControlPacket {
        diag: Diagnostic::None,
        state: State::Down,
        poll: false,
        final_: false,
        control_plane_independent: false,
        demand: false,
        detect_mult: 3,
        my_discr: 5,
        your_discr: 0,
        desired_min_tx_us: 1_000_000,
        required_min_rx_us: 1_000_000,
        required_min_echo_rx_us: 0,
    }
    .encode();
    // Default TTL (64): dropped by the GTSM check.
    sock.send_to(&valid, dst).unwrap();
    sock.set_ttl(255).unwrap();
    // Garbage with TTL 255.
    sock.send_to(&[0u8; 24], dst).unwrap();
    // Valid, but from an address with no session, and to an unknown discriminator.
    sock.send_to(&valid, dst).unwrap();
    let mut unknown = ControlPacket::decode(&valid).unwrap();
    unknown.your_discr = 0xdead_beef;
    sock.send_to(&unknown.encode(), dst).unwrap();
    let want = BfdStats {
        rx_bad_ttl: 1,
        rx_invalid: 1,
        rx_no_session: 2,
    };
    poll(|| (mgr.stats() == want).then_some(()));
}

#[test]
fn hundreds_of_sessions_on_one_thread() {
    let (mgr, _) = manager();
    let rt = rt();
    let (tx, mut rx) = mpsc::channel(4096);
    // 100 ms x 5 leaves room for a loaded test machine; the FRR test covers 50 ms x 3.
    let params = SessionParams {
        desired_min_tx: 100 * MS,
        required_min_rx: 100 * MS,
        detect_mult: 5,
        ..fast()
    };
    let mut handles = Vec::new();
    let pairs = 200u32;
    for i in 0..pairs {
        let (hi, lo) = ((i / 250) as u8, (i % 250 + 1) as u8);
        let a = format!("127.1.{hi}.{lo}");
        let b = format!("127.2.{hi}.{lo}");
        handles.push(
            mgr.add_session(params, target(i, &b, &a), tx.clone())
                .unwrap(),
        );
        handles.push(
            mgr.add_session(params, target(pairs + i, &a, &b), tx.clone())
                .unwrap(),
        );
    }
    let n = handles.len();
    let mut up = HashSet::new();
    rt.block_on(async {
        while up.len() < n {
            let r = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("a report within 30 s")
                .unwrap();
            if r.ok {
                up.insert(r.backend_id);
            }
        }
    });
    // They stay Up at the fast rate: every session keeps receiving, and no Down is reported.
    let rx0: Vec<u64> = handles.iter().map(|h| h.status().rx_packets).collect();
    poll(|| {
        handles
            .iter()
            .zip(&rx0)
            .all(|(h, r0)| h.status().rx_packets >= r0 + 5)
            .then_some(())
    });
    while let Ok(r) = rx.try_recv() {
        assert!(r.ok, "unexpected {r:?}");
    }
    assert!(
        handles
            .iter()
            .all(|h| h.status().tx_interval == Some(100 * MS))
    );
}

#[test]
fn detail_strings() {
    use Diagnostic as D;
    use State as S;
    assert_eq!(state_detail(S::Up, D::None, S::Up, D::None), "bfd Up");
    assert_eq!(state_detail(S::Init, D::None, S::Down, D::None), "bfd Init");
    assert_eq!(
        state_detail(S::Down, D::ControlDetectionTimeExpired, S::Up, D::None),
        "bfd Down (control detection time expired)"
    );
    assert_eq!(
        state_detail(
            S::Down,
            D::NeighborSignaledSessionDown,
            S::Down,
            D::ControlDetectionTimeExpired
        ),
        "bfd Down (neighbor signaled session down: control detection time expired)"
    );
    // FRR's AdminDown packets carry diag 0.
    assert_eq!(
        state_detail(
            S::Down,
            D::NeighborSignaledSessionDown,
            S::AdminDown,
            D::None
        ),
        "bfd Down (neighbor signaled session down: administratively down)"
    );
    assert_eq!(
        state_detail(S::Down, D::NeighborSignaledSessionDown, S::Down, D::None),
        "bfd Down (neighbor signaled session down)"
    );
}
