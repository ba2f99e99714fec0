//! Root-only tests of the VPN-protocol probes (`wireguard`, `ikev2`) against real daemons.
//!
//! Each test builds a prober namespace `vpnlb-vp<tag>p` and a gateway namespace `vpnlb-vp<tag>g`
//! joined by a veth pair (10.219.0.1/24 + fd00:219::1/64 on the prober's `vp0`, .2 / ::2 on the
//! gateway's `vp1`). The
//! probes run on a `Netns::run` thread in the prober namespace through the runner's `probe_once`
//! (the same dispatch the agent uses). The daemons run in the gateway namespace:
//! - wireguard-go on `vvpg0` (the UAPI socket path is global, so the name is unique to this file),
//!   configured with `wg set`: the probe's public key is a peer with AllowedIPs 10.219.9.77/32,
//!   an address nobody uses.
//! - charon (strongSwan) as [`vpnlb_tests::ipsec::Charon`] runs it: its own /run (bind mount in a
//!   private mount namespace), strongswan.conf and vici socket in the lab's temporary directory,
//!   one IKEv2 PSK connection loaded with `swanctl --load-all`.
//!
//! Each daemon is shown answering, then frozen with SIGSTOP (the VPN probe fails with its timeout
//! detail while an ICMP probe of the same address still succeeds: the host is up, the VPN daemon is
//! wedged), thawed with SIGCONT (answers again), then killed (fails). Daemons are killed by PID
//! in a guard, the namespaces deleted and the directory removed on drop, also when a test panics.
//!
//! Needs: wireguard-go wireguard-tools strongswan-charon strongswan-swanctl
//! libcharon-extra-plugins libstrongswan-standard-plugins libstrongswan-extra-plugins.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vpnlb::health::runner;
use vpnlb::health::spec::{CheckResult, CheckSpec, CheckTarget, CheckTiming};
use vpnlb::health::wireguard::public_key_of;
use vpnlb_tests::ipsec::Charon;
use vpnlb_tests::netns::{Netns, ip};
use vpnlb_tests::wg::uapi_listening;

const PROBER_V4: &str = "10.219.0.1";
const GATEWAY_V4: &str = "10.219.0.2";
const PROBER_V6: &str = "fd00:219::1";
const GATEWAY_V6: &str = "fd00:219::2";
/// Probe timeout here; the interval only matters to the runner and is not used by probe_once.
const TIMEOUT_MS: u64 = 300;
/// Space between WireGuard probes: wireguard-go drops initiations from one key < 20 ms apart.
const WG_SPACING: Duration = Duration::from_millis(100);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A prober and a gateway namespace joined by a veth pair, plus a scratch directory; all removed
/// on drop (fields drop in order: the directory last).
struct Lab {
    prober: Netns,
    gateway: Netns,
    dir: ScratchDir,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let prober = Netns::new(&format!("vpnlb-vp{tag}p"));
        let gateway = Netns::new(&format!("vpnlb-vp{tag}g"));
        ip(&[
            "-n",
            prober.name(),
            "link",
            "add",
            "vp0",
            "type",
            "veth",
            "peer",
            "name",
            "vp1",
            "netns",
            gateway.name(),
        ]);
        prober.sh(&format!(
            "ip addr add {PROBER_V4}/24 dev vp0 && ip addr add {PROBER_V6}/64 dev vp0 nodad \
             && ip link set vp0 up"
        ));
        gateway.sh(&format!(
            "ip addr add {GATEWAY_V4}/24 dev vp1 && ip addr add {GATEWAY_V6}/64 dev vp1 nodad \
             && ip link set vp1 up"
        ));
        // IPv6 is usable once neighbour discovery works (bounded wait).
        prober.sh(&format!(
            "for i in $(seq 50); do ping -6 -c1 -W1 -q {GATEWAY_V6} >/dev/null 2>&1 && exit 0; \
             sleep 0.1; done; exit 1"
        ));
        let dir = ScratchDir::new(tag);
        Lab {
            prober,
            gateway,
            dir,
        }
    }

    /// Probes `spec` once from the prober namespace.
    fn probe(&self, spec: &CheckSpec) -> CheckResult {
        self.probe_at(spec, GATEWAY_V4)
    }

    /// Probes `spec` once from the prober namespace against `addr`.
    fn probe_at(&self, spec: &CheckSpec, addr: &str) -> CheckResult {
        let target = CheckTarget {
            addr: addr.parse().expect("addr"),
            ..target()
        };
        self.prober.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(runner::probe_once(spec, &target))
                .expect("probe starts")
        })
    }

    /// Probes until a success, at most `tries` times `gap` apart; the success and how many tries.
    fn probe_until_ok(&self, spec: &CheckSpec, tries: u32, gap: Duration) -> (CheckResult, u32) {
        let mut last = None;
        for i in 1..=tries {
            let r = self.probe(spec);
            if r.ok {
                return (r, i);
            }
            last = Some(r.detail);
            std::thread::sleep(gap);
        }
        panic!("no success in {tries} probes; last: {last:?}");
    }

    /// Runs `spec` with the periodic runner (as the agent does) from the prober namespace and
    /// returns its first `n` results.
    fn run_checks(&self, spec: &CheckSpec, n: usize) -> Vec<CheckResult> {
        self.prober.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::channel(16);
                let _handle = runner::spawn(spec, target(), tx).expect("spawn");
                let mut out = Vec::new();
                while out.len() < n {
                    let r = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                        .await
                        .expect("a result within 5 s")
                        .expect("runner alive");
                    out.push(r);
                }
                out
            })
        })
    }

    fn icmp_ok(&self) {
        let r = self.probe(&CheckSpec::Icmp { timing: timing() });
        assert!(r.ok, "icmp must still succeed: {}", r.detail);
    }
}

struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> ScratchDir {
        let p = std::env::temp_dir().join(format!("vpnlb-vp{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        ScratchDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon we started: killed by its PID (SIGCONT first, so a stopped one dies too) and reaped
/// on drop.
struct Daemon {
    child: Child,
    name: &'static str,
    /// Files the daemon leaves behind when killed (wireguard-go's global UAPI socket).
    leftovers: Vec<PathBuf>,
}

impl Daemon {
    /// Spawns `ip netns exec NS args...`. `ip netns exec`, `unshare` (without --fork) and
    /// `sh -c 'exec ...'` all exec, so the child's PID is the daemon's.
    fn spawn(ns: &Netns, args: &[&str], log: &Path, name: &'static str) -> Daemon {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Daemon {
            child,
            name,
            leftovers: Vec::new(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill {} {sig}", self.name);
    }

    /// Kills and reaps the daemon; afterwards the drop is a no-op.
    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGCONT);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for f in &self.leftovers {
            let _ = std::fs::remove_file(f);
        }
    }

    /// The daemon's command name, once it has exec'd into it (bounded wait).
    fn wait_comm(&mut self, comm: &str) {
        let path = format!("/proc/{}/comm", self.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now.trim() == comm {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited early: {st}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} never became {comm} (is {now:?})",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn timing() -> CheckTiming {
    CheckTiming {
        interval_ms: 1000,
        timeout_ms: TIMEOUT_MS,
        ..CheckTiming::default()
    }
}

fn target() -> CheckTarget {
    CheckTarget {
        backend_id: 1,
        check_index: 0,
        generation: 0,
        addr: GATEWAY_V4.parse().expect("addr"),
        source: None,
        interface: None,
    }
}

/// Runs a command on the host (not in a namespace), panicking with its stderr on failure.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "`{cmd} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (bounded) until `ready()`.
fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.expect("latency reported").as_secs_f64() * 1000.0
}

fn summary(rtts: &mut [f64]) -> String {
    rtts.sort_by(f64::total_cmp);
    format!(
        "min {:.2} ms, median {:.2} ms, max {:.2} ms over {}",
        rtts[0],
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1],
        rtts.len()
    )
}

const WG_IF: &str = "vvpg0";

#[test]
#[ignore = "needs root and wireguard-go/strongswan: run cargo xtask test"]
fn wireguard_probe_against_wireguard_go() {
    let _serial = serial();
    let lab = Lab::new("wg");
    let dir = lab.dir.path();
    let gw_key = run("wg", &["genkey"]);
    let probe_key = run("wg", &["genkey"]);
    let gw_pub = public_key_of(&gw_key).expect("gateway key");
    let probe_pub = public_key_of(&probe_key).expect("probe key");
    let gw_key_file = dir.join("gw.key");
    std::fs::write(&gw_key_file, &gw_key).expect("gw key");
    // The probe reads its key from a file, as an operator would configure it.
    let probe_key_file = dir.join("probe.key");
    std::fs::write(&probe_key_file, &probe_key).expect("probe key");

    let sock = Path::new("/var/run/wireguard").join(format!("{WG_IF}.sock"));
    // A SIGKILLed run leaves its socket: gone before we wait for the new one.
    let _ = std::fs::remove_file(&sock);
    let mut wg = Daemon::spawn(
        &lab.gateway,
        &["wireguard-go", "-f", WG_IF],
        &dir.join("wireguard-go.log"),
        "wireguard-go",
    );
    wg.leftovers.push(sock);
    wg.wait_comm("wireguard-go");
    // Listening, not only there: `wg set` unlinks a socket file that refuses connections, which
    // it does between wireguard-go's bind(2) and listen(2), and the daemon then exits (see
    // WgDaemon::start).
    wait_until("wireguard-go's UAPI socket listening", || {
        uapi_listening(WG_IF)
    });
    lab.gateway.sh(&format!(
        "wg set {WG_IF} private-key {} listen-port 51820 peer {probe_pub} allowed-ips 10.219.9.77/32 \
         && ip addr add 10.219.9.1/24 dev {WG_IF} && ip link set {WG_IF} up",
        gw_key_file.display()
    ));

    let spec = CheckSpec::Wireguard {
        port: 51820,
        public_key: gw_pub.clone(),
        private_key: None,
        private_key_file: Some(probe_key_file.to_str().expect("utf-8").into()),
        inside: None,
        timing: timing(),
    };

    // Up: a real handshake, its RTT reported as latency.
    let mut rtts = Vec::new();
    for _ in 0..10 {
        let r = lab.probe(&spec);
        assert!(r.ok, "wireguard probe: {}", r.detail);
        assert!(r.detail.starts_with("handshake response "), "{}", r.detail);
        rtts.push(ms(r.latency));
        std::thread::sleep(WG_SPACING);
    }
    println!("wireguard handshake RTT: {}", summary(&mut rtts));
    // The gateway saw the probe peer's handshake.
    let hs = lab
        .gateway
        .sh(&format!("wg show {WG_IF} latest-handshakes"));
    let line = hs
        .lines()
        .find(|l| l.starts_with(&probe_pub))
        .unwrap_or_else(|| panic!("probe peer missing: {hs}"));
    let t: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("handshake time");
    assert!(t > 0, "no handshake recorded: {line}");

    // Over IPv6 too.
    let r = lab.probe_at(&spec, GATEWAY_V6);
    assert!(r.ok, "wireguard over IPv6: {}", r.detail);
    println!("wireguard over IPv6: {}", r.detail);
    std::thread::sleep(WG_SPACING);

    // Informational: wireguard-go's handshake-flood guard (initiations from one key < 20 ms
    // apart are dropped) is why probes are spaced; not asserted, it depends on scheduling.
    let a = lab.probe(&spec);
    let b = lab.probe(&spec);
    println!(
        "wireguard back-to-back probes: first {:?}, second {:?}",
        a.detail, b.detail
    );
    std::thread::sleep(WG_SPACING);

    // The periodic runner, as the agent runs it: every probe of a 200 ms cadence succeeds.
    let periodic = CheckSpec::Wireguard {
        port: 51820,
        public_key: gw_pub.clone(),
        private_key: Some(probe_key.trim().into()),
        private_key_file: None,
        inside: None,
        timing: CheckTiming {
            interval_ms: 200,
            timeout_ms: 150,
            ..CheckTiming::default()
        },
    };
    let results = lab.run_checks(&periodic, 5);
    for r in &results {
        assert!(r.ok && r.latency.is_some(), "runner: {}", r.detail);
    }
    std::thread::sleep(WG_SPACING);

    // A probe with a key the gateway does not know gets no answer (wireguard-go drops it).
    let stranger = CheckSpec::Wireguard {
        port: 51820,
        public_key: gw_pub.clone(),
        private_key: Some(run("wg", &["genkey"]).trim().into()),
        private_key_file: None,
        inside: None,
        timing: timing(),
    };
    let r = lab.probe(&stranger);
    assert!(!r.ok);
    assert_eq!(
        r.detail,
        format!("no handshake response after {TIMEOUT_MS}ms")
    );

    // Wedged daemon: ping says up, the VPN probe says down.
    wg.signal(libc::SIGSTOP);
    for _ in 0..2 {
        let r = lab.probe(&spec);
        assert!(!r.ok, "stopped daemon answered: {}", r.detail);
        assert_eq!(
            r.detail,
            format!("no handshake response after {TIMEOUT_MS}ms")
        );
        assert!(r.latency.is_none());
        lab.icmp_ok();
    }

    // Thawed: it first works through the initiations queued while stopped, so allow a few tries.
    wg.signal(libc::SIGCONT);
    std::thread::sleep(WG_SPACING);
    let (r, tries) = lab.probe_until_ok(&spec, 5, Duration::from_millis(200));
    println!("wireguard after SIGCONT: {} (try {tries})", r.detail);
    assert!(r.latency.is_some());

    // Dead: the port is closed (ICMP port unreachable) or silent; either way a failure.
    wg.kill();
    std::thread::sleep(WG_SPACING);
    let r = lab.probe(&spec);
    assert!(!r.ok, "dead daemon answered: {}", r.detail);
    println!("wireguard after kill: {}", r.detail);
    assert!(
        r.detail == "connection refused"
            || r.detail == format!("no handshake response after {TIMEOUT_MS}ms"),
        "{}",
        r.detail
    );
    lab.icmp_ok();
}

/// One IKEv2 PSK connection; it proposes x25519 only, so our KE (MODP-1024) draws
/// INVALID_KE_PAYLOAD asking for group 31.
const SWANCTL_CONF: &str = r#"connections {
  probe-gw {
    version = 2
    local_addrs = 10.219.0.2, fd00:219::2
    proposals = aes256-sha256-x25519
    local {
      auth = psk
      id = gw.vpnlb.test
    }
    remote {
      auth = psk
    }
    children {
      net {
        local_ts = 10.219.8.0/24
      }
    }
  }
}
secrets {
  ike-probe {
    secret = "vpnlb-probe-test-secret"
  }
}
"#;

/// charon holds no IKE_SA, not even a half-open one.
fn no_ike_sa(charon: &Charon) {
    let sas = charon.swanctl(&["--list-sas"]).expect("list-sas");
    assert!(sas.trim().is_empty(), "charon holds SAs:\n{sas}");
    let stats = charon.swanctl(&["--stats"]).expect("stats");
    assert!(
        stats.contains("IKE_SAs: 0 total, 0 half-open"),
        "charon stats:\n{stats}"
    );
}

#[test]
#[ignore = "needs root and wireguard-go/strongswan: run cargo xtask test"]
fn ikev2_probe_against_charon() {
    let _serial = serial();
    let lab = Lab::new("ike");
    let dir = lab.dir.path();
    // Routes are never needed: no CHILD_SA is built here.
    let mut charon = Charon::start(lab.gateway.name(), dir, "  install_routes = no");
    let loaded = charon.load(SWANCTL_CONF);
    assert!(loaded.contains("loaded connection 'probe-gw'"), "{loaded}");

    let spec = CheckSpec::Ikev2 {
        port: 500,
        timing: timing(),
    };

    // Up: INVALID_KE_PAYLOAD naming the group charon wants, and no state left behind.
    let mut rtts = Vec::new();
    for _ in 0..10 {
        let r = lab.probe(&spec);
        assert!(r.ok, "ikev2 probe: {}", r.detail);
        assert!(
            r.detail.starts_with("INVALID_KE_PAYLOAD (group 31) "),
            "{}",
            r.detail
        );
        rtts.push(ms(r.latency));
    }
    println!("ikev2 INVALID_KE_PAYLOAD RTT: {}", summary(&mut rtts));
    // Over IPv6 too.
    let r = lab.probe_at(&spec, GATEWAY_V6);
    assert!(
        r.ok && r.detail.starts_with("INVALID_KE_PAYLOAD (group 31) "),
        "ikev2 over IPv6: {}",
        r.detail
    );
    // The same on the NAT-T port (non-ESP marker).
    let natt = CheckSpec::Ikev2 {
        port: 4500,
        timing: timing(),
    };
    let r = lab.probe(&natt);
    assert!(
        r.ok && r.detail.starts_with("INVALID_KE_PAYLOAD (group 31) "),
        "port 4500: {}",
        r.detail
    );
    no_ike_sa(&charon);
    // The periodic runner, as the agent runs it.
    let periodic = CheckSpec::Ikev2 {
        port: 500,
        timing: CheckTiming {
            interval_ms: 100,
            timeout_ms: 80,
            ..CheckTiming::default()
        },
    };
    for r in lab.run_checks(&periodic, 5) {
        assert!(r.ok && r.latency.is_some(), "runner: {}", r.detail);
    }
    no_ike_sa(&charon);

    // A gateway that only takes MODP-2048 asks for group 14 instead.
    charon.load(&SWANCTL_CONF.replace("aes256-sha256-x25519", "aes128-sha256-modp2048"));
    let r = lab.probe(&spec);
    assert!(
        r.ok && r.detail.starts_with("INVALID_KE_PAYLOAD (group 14) "),
        "{}",
        r.detail
    );
    // One that takes nothing we propose still answers: alive, NO_PROPOSAL_CHOSEN.
    charon.load(&SWANCTL_CONF.replace("aes256-sha256-x25519", "aes128-sha256-ecp224"));
    let r = lab.probe(&spec);
    println!("ikev2 against a proposal mismatch: {}", r.detail);
    assert!(
        r.ok && r.detail.starts_with("NO_PROPOSAL_CHOSEN "),
        "{}",
        r.detail
    );
    no_ike_sa(&charon);
    charon.load(SWANCTL_CONF);

    // Wedged daemon: ping says up, the IKE probe says down.
    charon.signal(libc::SIGSTOP);
    for _ in 0..2 {
        let r = lab.probe(&spec);
        assert!(!r.ok, "stopped charon answered: {}", r.detail);
        assert_eq!(r.detail, format!("no response after {TIMEOUT_MS}ms"));
        lab.icmp_ok();
    }

    // Thawed: answers again (its answers to the queued requests go to closed sockets).
    charon.signal(libc::SIGCONT);
    let (r, tries) = lab.probe_until_ok(&spec, 5, Duration::from_millis(200));
    println!("ikev2 after SIGCONT: {} (try {tries})", r.detail);
    assert!(r.detail.starts_with("INVALID_KE_PAYLOAD (group 31) "));
    no_ike_sa(&charon);

    // Dead: port 500 closed.
    charon.kill();
    let r = lab.probe(&spec);
    assert!(!r.ok, "dead charon answered: {}", r.detail);
    println!("ikev2 after kill: {}", r.detail);
    assert!(
        r.detail == "connection refused" || r.detail == format!("no response after {TIMEOUT_MS}ms"),
        "{}",
        r.detail
    );
    lab.icmp_ok();
}
