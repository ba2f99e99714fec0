//! Root-only tests of the periodic health probes against real servers in network namespaces.
//!
//! Each test builds a client namespace `vpnlb-hc<tag>c` and a backend namespace `vpnlb-hc<tag>b`
//! joined by a veth pair (10.213.0.1/24 + fd00:213::1/64 on the client's `hc0`, .2 / ::2 on the
//! backend's `hc1`). Server sockets are created inside the backend namespace with `Netns::run` and
//! served from the test's tokio runtime, whose threads all live in the client namespace (it is built
//! on a `Netns::run` thread, and threads inherit their creator's namespace), so every probe socket
//! is a client-namespace socket. ICMP is answered by the backend's kernel; TCP, HTTP, HTTPS (rcgen
//! self-signed certificate) and UDP by in-process servers. Each kind is shown working, then broken
//! (server stopped, socket dropped, link down, 503, wrong body, untrusted certificate) with the
//! failure's detail checked. The namespaces are deleted on drop, also when a test panics.
//!
//! The tests take a process-wide lock so they run one at a time: the cadence and scale checks
//! measure time and CPU and should not share the two cores with each other.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vpnlb::health::icmp::{self, IcmpProbe, IcmpSocketKind};
use vpnlb::health::probe::ProbeOk;
use vpnlb::health::runner;
use vpnlb::health::spec::{CheckResult, CheckSpec, CheckTarget, CheckTiming};
use vpnlb::health::{http, tcp, udp};
use vpnlb_tests::netns::{Netns, ip};

const CLIENT_V4: &str = "10.213.0.1";
const BACKEND_V4: &str = "10.213.0.2";
const CLIENT_V6: &str = "fd00:213::1";
const BACKEND_V6: &str = "fd00:213::2";
/// Timeout of the probes here (the interval is 1 s unless a test says otherwise).
const TIMEOUT_MS: u64 = 300;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client and a backend namespace joined by a veth pair; both deleted on drop.
struct Lab {
    client: Netns,
    backend: Netns,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let client = Netns::new(&format!("vpnlb-hc{tag}c"));
        let backend = Netns::new(&format!("vpnlb-hc{tag}b"));
        // IPv6 addresses survive a link going down (the link-down tests bring it back up).
        for ns in [&client, &backend] {
            ns.sh("sysctl -qw net.ipv6.conf.all.keep_addr_on_down=1 net.ipv6.conf.default.keep_addr_on_down=1");
        }
        ip(&[
            "link",
            "add",
            "hc0",
            "netns",
            client.name(),
            "type",
            "veth",
            "peer",
            "name",
            "hc1",
            "netns",
            backend.name(),
        ]);
        client.sh(&format!(
            "ip addr add {CLIENT_V4}/24 dev hc0 && ip addr add {CLIENT_V6}/64 dev hc0 nodad && ip link set hc0 up"
        ));
        backend.sh(&format!(
            "ip addr add {BACKEND_V4}/24 dev hc1 && ip addr add {BACKEND_V6}/64 dev hc1 nodad && ip link set hc1 up"
        ));
        let lab = Lab { client, backend };
        lab.wait_operational();
        lab
    }

    fn backend_link(&self, up: bool) {
        self.backend.sh(&format!(
            "ip link set hc1 {}",
            if up { "up" } else { "down" }
        ));
        if up {
            self.wait_operational();
        }
    }

    /// Waits until both ends report operstate "up": the kernel activates a veth's queue only then
    /// (up to a second after the carrier comes on), and drops what is sent before.
    fn wait_operational(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, dev) in [(&self.client, "hc0"), (&self.backend, "hc1")] {
            while ns.sh(&format!("cat /sys/class/net/{dev}/operstate")).trim() != "up" {
                assert!(
                    Instant::now() < deadline,
                    "{dev} in {} not up after 5 s",
                    ns.name()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Runs `f` on a multi-threaded runtime whose threads all live in the client namespace.
    fn client<T: Send, Fut: Future<Output = T>>(&self, f: impl FnOnce() -> Fut + Send) -> T {
        self.client.run(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(f())
        })
    }
}

fn target(addr: &str) -> CheckTarget {
    CheckTarget {
        backend_id: 1,
        check_index: 0,
        generation: 0,
        addr: addr.parse().expect("address"),
        source: None,
        interface: None,
    }
}

fn timing(interval_ms: u64, timeout_ms: u64) -> CheckTiming {
    CheckTiming {
        interval_ms,
        timeout_ms,
        ..CheckTiming::default()
    }
}

fn ok<E: std::fmt::Display>(what: &str, r: Result<ProbeOk, E>) -> ProbeOk {
    match r {
        Ok(o) => {
            println!("{what}: ok, {}", o.detail);
            o
        }
        Err(e) => panic!(
            "{what}: expected success, got failure {e:?}",
            e = e.to_string()
        ),
    }
}

fn fails<E: std::fmt::Display>(what: &str, r: Result<ProbeOk, E>) -> String {
    match r {
        Ok(o) => panic!("{what}: expected a failure, got success ({})", o.detail),
        Err(e) => {
            let d = e.to_string();
            println!("{what}: failed, {d}");
            d
        }
    }
}

/// Polls `probe` until it fails (a link change or a server stop takes a moment), at most 5 s.
async fn until_fails<F, Fut, E>(what: &str, mut probe: F) -> String
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<ProbeOk, E>>,
    E: std::fmt::Display,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match probe().await {
            Err(e) => {
                let d = e.to_string();
                println!("{what}: failed, {d}");
                return d;
            }
            Ok(o) if Instant::now() > deadline => {
                panic!("{what}: still succeeding after 5 s ({})", o.detail)
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls `probe` until it succeeds, at most 10 s (a link coming back up needs neighbour resolution).
async fn until_ok<F, Fut, E>(what: &str, mut probe: F) -> ProbeOk
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<ProbeOk, E>>,
    E: std::fmt::Display,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match probe().await {
            Ok(o) => {
                println!("{what}: ok, {}", o.detail);
                return o;
            }
            Err(e) if Instant::now() > deadline => {
                panic!("{what}: still failing after 10 s ({e})")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn icmp_spec() -> CheckSpec {
    CheckSpec::Icmp {
        timing: timing(1000, TIMEOUT_MS),
    }
}

fn tcp_spec(port: u16) -> CheckSpec {
    CheckSpec::Tcp {
        port,
        timing: timing(1000, TIMEOUT_MS),
    }
}

fn http_spec(port: u16, body_contains: Option<&str>) -> CheckSpec {
    CheckSpec::Http {
        port,
        path: "/health".into(),
        expect_status: 200,
        body_contains: body_contains.map(Into::into),
        host: None,
        timing: timing(1000, TIMEOUT_MS),
    }
}

fn https_spec(
    port: u16,
    host: Option<&str>,
    insecure: bool,
    ca_file: Option<&std::path::Path>,
) -> CheckSpec {
    CheckSpec::Https {
        port,
        path: "/health".into(),
        expect_status: 200,
        body_contains: Some("gateway ok".into()),
        host: host.map(Into::into),
        insecure,
        ca_file: ca_file.map(|p| p.display().to_string()),
        timing: timing(1000, TIMEOUT_MS),
    }
}

fn udp_spec(
    port: u16,
    payload: Option<&str>,
    payload_hex: Option<&str>,
    expect: Option<&str>,
    expect_hex: Option<&str>,
) -> CheckSpec {
    CheckSpec::Udp {
        port,
        payload: payload.map(Into::into),
        payload_hex: payload_hex.map(Into::into),
        expect: expect.map(Into::into),
        expect_hex: expect_hex.map(Into::into),
        timing: timing(1000, TIMEOUT_MS),
    }
}

/// A dual-stack TCP listener on `[::]:port` inside `ns`.
fn listen_tcp(ns: &Netns, port: u16) -> std::net::TcpListener {
    ns.run(|| {
        let l = std::net::TcpListener::bind(("::", port)).expect("bind tcp listener");
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
}

/// A dual-stack UDP socket on `[::]:port` inside `ns`.
fn bind_udp(ns: &Netns, port: u16) -> std::net::UdpSocket {
    ns.run(|| {
        let s = std::net::UdpSocket::bind(("::", port)).expect("bind udp socket");
        s.set_nonblocking(true).expect("nonblocking");
        s
    })
}

/// What the HTTP(S) server answers; the test changes it to break the check.
#[derive(Clone)]
struct HttpState {
    status: Arc<AtomicU16>,
    body: Arc<Mutex<String>>,
}

impl HttpState {
    fn new() -> HttpState {
        HttpState {
            status: Arc::new(AtomicU16::new(200)),
            body: Arc::new(Mutex::new("gateway ok".into())),
        }
    }

    fn set(&self, status: u16, body: &str) {
        self.status.store(status, Ordering::Relaxed);
        *self.body.lock().unwrap_or_else(|e| e.into_inner()) = body.into();
    }
}

/// Serves HTTP/1.1 (over TLS with `tls`) on `listener` until the returned task is aborted; the
/// listener closes with it.
fn serve_http(
    listener: std::net::TcpListener,
    state: HttpState,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> JoinHandle<()> {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            let tls = tls.clone();
            // Connections live in the set, so aborting the server ends them too.
            conns.spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let body = state.body.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() =
                            hyper::StatusCode::from_u16(state.status.load(Ordering::Relaxed))
                                .expect("status");
                        Ok::<_, Infallible>(resp)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            });
            while conns.try_join_next().is_some() {}
        }
    })
}

/// Answers every datagram with `pong:` + the datagram, until aborted (the socket closes with it).
fn serve_udp(sock: std::net::UdpSocket) -> JoinHandle<()> {
    let sock = tokio::net::UdpSocket::from_std(sock).expect("tokio udp socket");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let mut reply = b"pong:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from).await;
        }
    })
}

/// Files removed on drop (CA certificates written for the HTTPS checks).
struct TempFiles(Vec<PathBuf>);

impl TempFiles {
    fn write(&mut self, name: &str, contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vpnlb-hc-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.0.push(path.clone());
        path
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn icmp_echo_v4_v6_link_down_and_unreachable() {
    let _serial = serial();
    let lab = Lab::new("icmp");
    // The backend routes (forwarding on, no route on): it answers probes to 10.214.0.9 /
    // fd00:214::9, which the client sends through it, with "network unreachable" errors.
    lab.backend
        .sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
    lab.client.sh(&format!(
        "ip route add 10.214.0.0/24 via {BACKEND_V4} && ip -6 route add fd00:214::/64 via {BACKEND_V6}"
    ));
    // Ping sockets need our group in the range (per namespace; the default excludes everyone).
    lab.client.sh("sysctl -qw net.ipv4.ping_group_range='0 0'");
    lab.client(|| async {
        let spec = icmp_spec();
        for addr in [BACKEND_V4, BACKEND_V6] {
            let o = ok(addr, icmp::probe_once(&spec, &target(addr)).await);
            assert!(o.detail.starts_with("echo reply "), "{}", o.detail);
            assert!(o.latency < Duration::from_millis(TIMEOUT_MS));
        }
        // Bound to the source address and the interface.
        let bound = CheckTarget {
            source: Some(CLIENT_V4.parse().expect("addr")),
            interface: Some("hc0".into()),
            ..target(BACKEND_V4)
        };
        ok("bound v4", icmp::probe_once(&spec, &bound).await);
        let bound6 = CheckTarget {
            source: Some(CLIENT_V6.parse().expect("addr")),
            interface: Some("hc0".into()),
            ..target(BACKEND_V6)
        };
        ok("bound v6", icmp::probe_once(&spec, &bound6).await);
        // A wrong interface: the kernel has no route out of lo for it.
        let wrong_dev = CheckTarget {
            interface: Some("lo".into()),
            ..target(BACKEND_V4)
        };
        fails("bound to lo", icmp::probe_once(&spec, &wrong_dev).await);

        // Unprivileged ping sockets.
        for addr in [BACKEND_V4, BACKEND_V6] {
            let p = IcmpProbe::with_kind(&target(addr), IcmpSocketKind::Ping).expect("ping socket");
            assert_eq!(p.socket_kind(), IcmpSocketKind::Ping);
            ok(
                &format!("ping socket {addr}"),
                p.probe(Duration::from_millis(TIMEOUT_MS)).await,
            );
        }

        // Two raw sockets (unbound / bound to the source) probing the same host: each one's BPF
        // filter keeps only the replies carrying its own identifier.
        let a = IcmpProbe::new(&target(BACKEND_V4)).expect("raw a");
        let b = IcmpProbe::new(&CheckTarget {
            source: Some(CLIENT_V4.parse().expect("addr")),
            ..target(BACKEND_V4)
        })
        .expect("raw b");
        assert_eq!(a.socket_kind(), IcmpSocketKind::Raw);
        let (a0, b0) = (a.socket_stats(), b.socket_stats());
        assert_ne!(a0.ident, b0.ident);
        for _ in 0..10 {
            let t = Duration::from_millis(TIMEOUT_MS);
            let (ra, rb) = tokio::join!(a.probe(t), b.probe(t));
            ok("shared a", ra);
            ok("shared b", rb);
        }
        let (a1, b1) = (a.socket_stats(), b.socket_stats());
        println!("socket a {a0:?} -> {a1:?}, socket b {b0:?} -> {b1:?}");
        assert_eq!(a1.matched - a0.matched, 10);
        assert_eq!(b1.matched - b0.matched, 10);
        assert_eq!(a1.received - a0.received, 10, "a got b's replies");
        assert_eq!(b1.received - b0.received, 10, "b got a's replies");
        assert_eq!((a1.in_flight, b1.in_flight), (0, 0));

        // ICMP errors quoting our requests fail the probe at once, with the reason.
        let d = fails(
            "via router v4",
            icmp::probe_once(&spec, &target("10.214.0.9")).await,
        );
        assert_eq!(d, format!("network unreachable from {BACKEND_V4}"));
        let d = fails(
            "via router v6",
            icmp::probe_once(&spec, &target("fd00:214::9")).await,
        );
        // The details above are the routers' ICMP errors, not "no reply after ...": errors are
        // reported as such, not as timeouts.
        assert_eq!(d, format!("no route to destination from {BACKEND_V6}"));

        // Link down: no reply; back up: replies again. (IPv6 flushes the neighbour on carrier loss
        // and sendto may fail with ENOBUFS while it re-resolves into a dead link.)
        lab.backend_link(false);
        let t = target(BACKEND_V4);
        let d = until_fails("v4 link down", || icmp::probe_once(&spec, &t)).await;
        assert_eq!(d, format!("no reply after {TIMEOUT_MS}ms"));
        let t = target(BACKEND_V6);
        let d = until_fails("v6 link down", || icmp::probe_once(&spec, &t)).await;
        assert!(
            d == format!("no reply after {TIMEOUT_MS}ms") || d == "send: no buffer space",
            "{d}"
        );
        assert_eq!(a.socket_stats().in_flight, 0, "timed-out probes unregister");
        lab.backend_link(true);
        for addr in [BACKEND_V4, BACKEND_V6] {
            let t = target(addr);
            until_ok(addr, || icmp::probe_once(&spec, &t)).await;
        }
    });
    // Every probe is gone, so every shared socket is closed and its receive thread has ended.
    let deadline = Instant::now() + Duration::from_secs(3);
    while icmp_receive_threads() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} icmp receive threads left",
            icmp_receive_threads()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Threads of this process named `vpnlb-icmp-rx`.
fn icmp_receive_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "vpnlb-icmp-rx")
        .count()
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn tcp_connect_refused_and_timeout() {
    let _serial = serial();
    let lab = Lab::new("tcp");
    let listener = listen_tcp(&lab.backend, 7001);
    lab.client(|| async {
        let spec = tcp_spec(7001);
        for addr in [BACKEND_V4, BACKEND_V6] {
            let o = ok(addr, tcp::probe_once(&spec, &target(addr)).await);
            assert!(o.detail.starts_with("connected "), "{}", o.detail);
        }
        let bound = CheckTarget {
            source: Some(CLIENT_V4.parse().expect("addr")),
            interface: Some("hc0".into()),
            ..target(BACKEND_V4)
        };
        ok("bound", tcp::probe_once(&spec, &bound).await);
        // The runner's one-shot form reports a CheckResult.
        let r = runner::probe_once(&spec, &target(BACKEND_V4))
            .await
            .expect("valid spec");
        assert!(r.ok && r.latency.is_some(), "{r:?}");

        drop(listener);
        for addr in [BACKEND_V4, BACKEND_V6] {
            let d = fails(addr, tcp::probe_once(&spec, &target(addr)).await);
            assert_eq!(d, "connection refused");
        }
        let r = runner::probe_once(&spec, &target(BACKEND_V4))
            .await
            .expect("valid spec");
        assert!(!r.ok && r.latency.is_none() && r.detail == "connection refused");

        lab.backend_link(false);
        let t = target(BACKEND_V4);
        let d = until_fails("link down", || tcp::probe_once(&spec, &t)).await;
        assert_eq!(d, format!("timeout after {TIMEOUT_MS}ms"));
        lab.backend_link(true);
    });
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn http_status_body_and_stopped_server() {
    let _serial = serial();
    let lab = Lab::new("http");
    let listener = listen_tcp(&lab.backend, 8080);
    lab.client(|| async {
        let state = HttpState::new();
        let server = serve_http(listener, state.clone(), None);
        let spec = http_spec(8080, Some("gateway ok"));
        for addr in [BACKEND_V4, BACKEND_V6] {
            let o = ok(addr, http::probe_once(&spec, &target(addr)).await);
            assert!(o.detail.starts_with("status 200 "), "{}", o.detail);
        }
        state.set(503, "gateway ok");
        let d = fails("503", http::probe_once(&spec, &target(BACKEND_V4)).await);
        assert_eq!(d, "status 503");
        state.set(200, "gateway degraded");
        let d = fails(
            "wrong body",
            http::probe_once(&spec, &target(BACKEND_V4)).await,
        );
        assert_eq!(d, "body mismatch");
        // Without body_contains any body passes.
        ok(
            "no body check",
            http::probe_once(&http_spec(8080, None), &target(BACKEND_V4)).await,
        );
        state.set(200, "gateway ok");
        ok(
            "healthy again",
            http::probe_once(&spec, &target(BACKEND_V4)).await,
        );

        server.abort();
        let _ = server.await;
        let t = target(BACKEND_V4);
        let d = until_fails("stopped", || http::probe_once(&spec, &t)).await;
        assert_eq!(d, "connection refused");
    });
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn https_insecure_ca_file_and_failed_verification() {
    let _serial = serial();
    let lab = Lab::new("tls");
    let listener = listen_tcp(&lab.backend, 8443);
    // The gateway's self-signed certificate names its IPv4 address and gw.test.
    let gw = rcgen::generate_simple_self_signed(vec![BACKEND_V4.to_string(), "gw.test".into()])
        .expect("gateway certificate");
    let other = rcgen::generate_simple_self_signed(vec!["other.test".to_string()])
        .expect("other certificate");
    let mut files = TempFiles(Vec::new());
    let gw_pem = files.write("gw.pem", &gw.cert.pem());
    let other_pem = files.write("other.pem", &other.cert.pem());
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(gw.cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(gw.signing_key.serialize_der())),
    )
    .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    lab.client(|| async {
        let state = HttpState::new();
        let server = serve_http(listener, state.clone(), Some(acceptor));
        let t = target(BACKEND_V4);
        // insecure: anything goes (also over IPv6, which the certificate does not name).
        let o = ok(
            "insecure",
            http::probe_once(&https_spec(8443, None, true, None), &t).await,
        );
        assert!(o.detail.starts_with("status 200 "), "{}", o.detail);
        ok(
            "insecure v6",
            http::probe_once(&https_spec(8443, None, true, None), &target(BACKEND_V6)).await,
        );
        // ca_file: verified against the IP address (no host) and against gw.test (SNI + Host).
        ok(
            "ca_file ip",
            http::probe_once(&https_spec(8443, None, false, Some(&gw_pem)), &t).await,
        );
        ok(
            "ca_file gw.test",
            http::probe_once(&https_spec(8443, Some("gw.test"), false, Some(&gw_pem)), &t).await,
        );
        // Failures: webpki roots do not know the certificate, another CA did not sign it, the
        // name does not match.
        let d = fails(
            "webpki roots",
            http::probe_once(&https_spec(8443, None, false, None), &t).await,
        );
        assert!(
            d.starts_with("tls: invalid peer certificate") && d.contains("UnknownIssuer"),
            "{d}"
        );
        let d = fails(
            "other ca",
            http::probe_once(&https_spec(8443, None, false, Some(&other_pem)), &t).await,
        );
        assert!(d.starts_with("tls: invalid peer certificate"), "{d}");
        let d = fails(
            "wrong name",
            http::probe_once(
                &https_spec(8443, Some("wrong.test"), false, Some(&gw_pem)),
                &t,
            )
            .await,
        );
        assert!(
            d.starts_with("tls: invalid peer certificate") && d.contains("wrong.test"),
            "{d}"
        );
        // Status and body are checked over TLS as over plain HTTP.
        state.set(503, "gateway ok");
        let d = fails(
            "503 over tls",
            http::probe_once(&https_spec(8443, None, true, None), &t).await,
        );
        assert_eq!(d, "status 503");
        server.abort();
    });
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn udp_reply_mismatch_closed_port_and_link_down() {
    let _serial = serial();
    let lab = Lab::new("udp");
    let sock = bind_udp(&lab.backend, 5301);
    lab.client(|| async {
        let server = serve_udp(sock);
        let spec = udp_spec(5301, Some("ping"), None, Some("pong:ping"), None);
        for addr in [BACKEND_V4, BACKEND_V6] {
            let o = ok(addr, udp::probe_once(&spec, &target(addr)).await);
            assert!(o.detail.starts_with("reply 9 bytes "), "{}", o.detail);
        }
        let hex = udp_spec(5301, None, Some("de ad be ef"), None, Some("3adeadbeef"));
        ok("hex", udp::probe_once(&hex, &target(BACKEND_V4)).await);
        let any = udp_spec(5301, None, None, None, None);
        ok(
            "any reply",
            udp::probe_once(&any, &target(BACKEND_V4)).await,
        );
        let wrong = udp_spec(5301, Some("ping"), None, Some("pong:pang"), None);
        let d = fails(
            "mismatch",
            udp::probe_once(&wrong, &target(BACKEND_V4)).await,
        );
        assert_eq!(d, "reply mismatch");

        // The socket closed: the backend's port unreachable comes back as "connection refused".
        server.abort();
        let _ = server.await;
        for addr in [BACKEND_V4, BACKEND_V6] {
            let t = target(addr);
            let d = until_fails(addr, || udp::probe_once(&spec, &t)).await;
            assert_eq!(d, "connection refused");
        }
        lab.backend_link(false);
        let t = target(BACKEND_V4);
        let d = until_fails("link down", || udp::probe_once(&spec, &t)).await;
        assert_eq!(d, format!("no reply after {TIMEOUT_MS}ms"));
        lab.backend_link(true);
    });
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn runner_cadence_all_kinds() {
    let _serial = serial();
    let lab = Lab::new("cad");
    let tcp_listener = listen_tcp(&lab.backend, 7001);
    let http_listener = listen_tcp(&lab.backend, 8080);
    let udp_sock = bind_udp(&lab.backend, 5301);
    lab.client(|| async {
        let _tcp_listener = tcp_listener;
        let state = HttpState::new();
        let _http = serve_http(http_listener, state.clone(), None);
        let _udp = serve_udp(udp_sock);
        let interval = 200u64;
        let t = timing(interval, 100);
        let specs = [
            CheckSpec::Icmp { timing: t.clone() },
            CheckSpec::Tcp {
                port: 7001,
                timing: t.clone(),
            },
            CheckSpec::Http {
                port: 8080,
                path: "/health".into(),
                expect_status: 200,
                body_contains: Some("ok".into()),
                host: None,
                timing: t.clone(),
            },
            CheckSpec::Udp {
                port: 5301,
                payload: Some("ping".into()),
                payload_hex: None,
                expect: Some("pong".into()),
                expect_hex: None,
                timing: t.clone(),
            },
        ];
        let (tx, mut rx) = mpsc::channel::<CheckResult>(1024);
        let start = Instant::now();
        let handles: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let t = CheckTarget {
                    check_index: i,
                    generation: 0,
                    ..target(BACKEND_V4)
                };
                runner::spawn(spec, t, tx.clone()).expect("spawn")
            })
            .collect();
        // BFD is refused by the runner.
        let bfd = CheckSpec::Bfd {
            desired_min_tx_ms: 300,
            required_min_rx_ms: 300,
            detect_mult: 3,
            passive: false,
            timing: CheckTiming::default(),
        };
        let err = runner::spawn(&bfd, target(BACKEND_V4), tx.clone()).expect_err("bfd");
        assert!(err.to_string().contains("bfd"), "{err}");

        // 10 intervals.
        let window = Duration::from_millis(10 * interval);
        let mut seen: Vec<Vec<CheckResult>> = vec![Vec::new(); specs.len()];
        while let Ok(Some(r)) = tokio::time::timeout_at((start + window).into(), rx.recv()).await {
            seen[r.check_index].push(r);
        }
        for (i, results) in seen.iter().enumerate() {
            let label = specs[i].label();
            // When the runner observed each result (its own stamp, not our receive time).
            let at: Vec<i64> = results
                .iter()
                .map(|r| r.at.duration_since(start).as_millis() as i64)
                .collect();
            println!("{label}: {} results at {at:?} ms", results.len());
            assert!(
                (9..=11).contains(&results.len()),
                "{label}: {} results in 10 intervals",
                results.len()
            );
            for r in results {
                assert!(r.ok, "{label}: {r:?}");
                assert_eq!(r.backend_id, 1);
            }
            assert!(
                at[0] < interval as i64 + 100,
                "{label}: first probe at {}",
                at[0]
            );
            let gaps: Vec<i64> = at.windows(2).map(|w| w[1] - w[0]).collect();
            // Each period is 180..220 ms (±10%); results also carry scheduling noise, so single
            // gaps get a wide margin and the mean a tight one.
            for g in &gaps {
                assert!((120..=280).contains(g), "{label}: gaps {gaps:?}");
            }
            let mean = (at[at.len() - 1] - at[0]) / (at.len() as i64 - 1);
            assert!(
                (185..=215).contains(&mean),
                "{label}: mean gap {mean} ms ({gaps:?})"
            );
            let spread = gaps.iter().max().unwrap_or(&0) - gaps.iter().min().unwrap_or(&0);
            assert!(spread >= 3, "{label}: no jitter in {gaps:?}");
        }

        // A broken backend shows up in the results: 503 from the HTTP server.
        state.set(503, "down");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let r = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .expect("results keep coming")
                .expect("channel open");
            if r.check_index == 2 && !r.ok {
                assert_eq!(r.detail, "status 503");
                break;
            }
        }

        // Dropping the handles stops the tasks: the channel closes once the last sender is gone.
        drop(handles);
        drop(tx);
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "check tasks still running after their handles were dropped"
        );
    });
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage struct we pass; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: initialised by the successful call above (and zeroed before it).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn scale_1000_icmp_and_1000_tcp_checks() {
    let _serial = serial();
    let lab = Lab::new("scale");
    // 1,024 backend addresses in one route (AnyIP: the backend answers for all of 10.215.0.0/22),
    // reached through the backend's link address so the client keeps one neighbour entry.
    lab.backend.sh("ip route add local 10.215.0.0/22 dev lo");
    lab.client
        .sh(&format!("ip route add 10.215.0.0/22 via {BACKEND_V4}"));
    let listener = lab.backend.run(|| {
        let s = socket_listener(7001);
        s.set_nonblocking(true).expect("nonblocking");
        s
    });
    const N: u32 = 1000;
    const WARMUP: Duration = Duration::from_secs(2);
    const WINDOW: Duration = Duration::from_secs(10);
    lab.client(|| async {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let accepts = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
                n += 1;
            }
            n
        });
        let (tx, mut rx) = mpsc::channel::<CheckResult>(8192);
        let addr = |i: u32| -> IpAddr {
            let base = u32::from(std::net::Ipv4Addr::new(10, 215, 0, 1));
            IpAddr::V4((base + i).into())
        };
        let mut handles = Vec::new();
        for i in 0..N {
            let t = CheckTarget {
                backend_id: i,
                check_index: 0,
                generation: 0,
                addr: addr(i),
                source: None,
                interface: None,
            };
            handles.push(
                runner::spawn(&icmp_spec_at(1000, 500), t.clone(), tx.clone()).expect("icmp"),
            );
            let t = CheckTarget {
                check_index: 1,
                generation: 0,
                ..t
            };
            handles.push(
                runner::spawn(
                    &CheckSpec::Tcp {
                        port: 7001,
                        timing: timing(1000, 500),
                    },
                    t,
                    tx.clone(),
                )
                .expect("tcp"),
            );
        }
        drop(tx);
        let stats_probe = IcmpProbe::new(&target("10.215.0.1")).expect("icmp socket");
        // Warm-up: every check has started after one interval (its random offset).
        let warm_until = tokio::time::Instant::now() + WARMUP;
        while tokio::time::timeout_at(warm_until, rx.recv()).await.is_ok() {}
        let icmp0 = stats_probe.socket_stats();
        let (cpu0, t0) = (cpu_time(), Instant::now());
        let until = tokio::time::Instant::now() + WINDOW;
        let (mut total, mut ok_icmp, mut ok_tcp, mut fail) = (0u64, 0u64, 0u64, 0u64);
        let mut failures: Vec<String> = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(until, rx.recv()).await {
            total += 1;
            match (r.ok, r.check_index) {
                (true, 0) => ok_icmp += 1,
                (true, _) => ok_tcp += 1,
                (false, _) => {
                    fail += 1;
                    if failures.len() < 5 {
                        failures.push(format!("{}#{}: {}", r.backend_id, r.check_index, r.detail));
                    }
                }
            }
        }
        let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
        let icmp1 = stats_probe.socket_stats();
        drop(handles);
        accepts.abort();
        let per_s = total as f64 / wall.as_secs_f64();
        let cpu_pct = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
        println!(
            "scale: {N} icmp + {N} tcp checks at 1 s: {total} results in {:.1} s = {per_s:.0}/s \
             (icmp ok {ok_icmp}, tcp ok {ok_tcp}, failed {fail} {failures:?}); \
             this process (probes + test servers): {:.2} s cpu = {cpu_pct:.1}% of one core; \
             icmp socket: received {} matched {}",
            wall.as_secs_f64(),
            cpu.as_secs_f64(),
            icmp1.received - icmp0.received,
            icmp1.matched - icmp0.matched,
        );
        // Gross sanity only: ~2,000 results a second, nearly all successful.
        assert!((1500.0..=2500.0).contains(&per_s), "{per_s:.0} results/s");
        assert!(
            fail * 100 <= total,
            "{fail} of {total} probes failed: {failures:?}"
        );
    });
}

fn icmp_spec_at(interval_ms: u64, timeout_ms: u64) -> CheckSpec {
    CheckSpec::Icmp {
        timing: timing(interval_ms, timeout_ms),
    }
}

/// A TCP listener with a deep accept queue (1,000 connects a second).
fn socket_listener(port: u16) -> std::net::TcpListener {
    let l = std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind");
    // SAFETY: listen(2) on a socket we own; only raises the backlog of an already listening socket.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    l
}
