//! `vpnlb gateway-check` run as a real process inside gateway namespaces set up wrong and right:
//! - settings: VIP missing or on the wrong interface, ARP sysctls, strict rp_filter (the effective
//!   value is the larger of `all` and the interface's), decap missing for a GUE VIP; the printed
//!   fixes are then applied as printed and the check passes;
//! - the reply test: daemons that answer from the gateway's own address (a UDP server bound to
//!   0.0.0.0 replying without pktinfo, OpenVPN without `--multihome`) fail; daemons that answer
//!   from the VIP (a server bound to the VIP, `openvpn --multihome`, wireguard-go with the probe key
//!   as a peer, a 0.0.0.0 server behind policy routing by source port with `src VIP`: boringtun's
//!   fix, charon answering the IKEv2 probe) pass, also when the reply leaves by another
//!   interface; the same over IPv6 (wireguard-go and servers on [::] / on the VIP). Exit codes: 0
//!   without a fail, 1 with one.
//!
//! Needs root, $VPNLB_BIN and $VPNLB_EBPF_OBJ (see tests/src/agent.rs), and the Debian packages
//! openvpn, openssl, wireguard-go, wireguard-tools and strongSwan (charon, swanctl).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vpnlb_tests::agent::{vpnlb_in, wait_for};
use vpnlb_tests::ipsec::{Charon, gateway_conf};
use vpnlb_tests::netns::{Netns, cable, switch};
use vpnlb_tests::testbed::{Sink, VIP};
use vpnlb_tests::wg::{Keypair, WgDaemon};

const OWN: &str = "10.78.0.11";
const VIP6: &str = "fd77::100";
const OWN6: &str = "fd78::11";
/// OpenVPN P_CONTROL_HARD_RESET_CLIENT_V2 (key id 0, session id 0102..08, no acks, packet id 0):
/// a server without tls-auth/tls-crypt answers it with P_CONTROL_HARD_RESET_SERVER_V2.
const OPENVPN_RESET: &str = "3801020304050607080000000000";

/// A gateway namespace on a switch, and a per-test directory for files and decap pins.
struct Bed {
    gw: Netns,
    _sw: Netns,
    dir: PathBuf,
    pins: PathBuf,
}

impl Bed {
    fn up(tag: &str) -> Bed {
        let sw = switch(&format!("vpnlb-gwc-{tag}-sw"));
        let gw = Netns::new(&format!("vpnlb-gwc-{tag}"));
        cable(&sw, "gw", &gw, &format!("{OWN}/24"));
        let id = format!("vpnlb-gwc-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Bed {
            gw,
            _sw: sw,
            dir,
            pins: PathBuf::from("/sys/fs/bpf").join(id),
        }
    }

    /// The DSR settings (VIP on lo, ARP sysctls, rp_filter off).
    fn right(&self) {
        self.gw.sh(&format!(
            "ip addr add {VIP}/32 dev lo && sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0"
        ));
    }

    /// `vpnlb gateway-check --vip VIP --iface eth0 ARGS --json`: exit code, findings by check.
    fn check(&self, args: &[&str]) -> (Option<i32>, Findings) {
        self.check_vip(&VIP.to_string(), args)
    }

    /// [`Bed::check`] for another VIP.
    fn check_vip(&self, vip: &str, args: &[&str]) -> (Option<i32>, Findings) {
        let pins = self.pins.display().to_string();
        let mut all = vec![
            "gateway-check",
            "--vip",
            vip,
            "--iface",
            "eth0",
            "--decap-pin-dir",
            &pins,
            "--timeout-ms",
            "500",
            "--json",
        ];
        all.extend_from_slice(args);
        let (code, out, err) = vpnlb_in(self.gw.name(), &all);
        let j: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("gateway-check {args:?}: not JSON ({e}): {out}{err}"));
        println!("gateway-check {args:?} -> {code:?}");
        for f in j["findings"].as_array().expect("findings") {
            println!("  {} {}: {}", f["level"], f["check"], f["message"]);
        }
        (code, Findings(j))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Findings(Value);

impl Findings {
    fn list(&self) -> &Vec<Value> {
        self.0["findings"].as_array().expect("findings")
    }

    /// Levels of every finding of `check`.
    fn levels(&self, check: &str) -> Vec<String> {
        self.list()
            .iter()
            .filter(|f| f["check"] == check)
            .map(|f| f["level"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn level(&self, check: &str) -> String {
        let l = self.levels(check);
        assert_eq!(l.len(), 1, "one {check} finding expected: {:#}", self.0);
        l[0].clone()
    }

    fn message(&self, check: &str) -> String {
        self.list()
            .iter()
            .find(|f| f["check"] == check)
            .and_then(|f| f["message"].as_str())
            .unwrap_or("")
            .to_string()
    }

    /// Asserts the exit code and the level of the one `check` finding (printing all on failure).
    fn expect(&self, code: Option<i32>, want_code: i32, check: &str, level: &str) {
        assert_eq!(
            (code, self.level(check).as_str()),
            (Some(want_code), level),
            "{check}: {:#}",
            self.0
        );
    }

    fn count(&self) -> BTreeMap<String, u64> {
        ["ok", "warn", "fail"]
            .iter()
            .map(|l| (l.to_string(), self.0["summary"][l].as_u64().unwrap_or(0)))
            .collect()
    }
}

/// A daemon started in a namespace by the test (nsenter execs it: the child's PID is the daemon's),
/// killed by PID on drop and when the test process dies.
struct Proc(Child);

impl Proc {
    fn spawn(ns: &Netns, args: &[&str], log: &PathBuf) -> Proc {
        let f = std::fs::File::create(log).expect("log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.name()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Proc(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {args:?}: {e}")),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An OpenVPN UDP server on 1194 (self-signed certificate, no tls-auth) in the gateway namespace,
/// up once its log says so.
fn openvpn(bed: &Bed, extra: &[&str]) -> Proc {
    let (cert, key) = (bed.dir.join("cert.pem"), bed.dir.join("key.pem"));
    if !cert.exists() {
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=vpnlb-gwc", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(ok.success(), "openssl req failed");
    }
    let log = bed.dir.join("openvpn.log");
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let mut args = vec![
        "openvpn",
        "--mode",
        "server",
        "--tls-server",
        "--proto",
        "udp",
        "--port",
        "1194",
        "--dev",
        "tun",
        "--dev-type",
        "tun",
        "--ca",
        &c,
        "--cert",
        &c,
        "--key",
        &k,
        "--dh",
        "none",
        "--topology",
        "subnet",
        "--server",
        "10.8.0.0",
        "255.255.255.0",
        "--verb",
        "3",
    ];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&bed.gw, &args, &log);
    let up = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("Initialization Sequence Completed"))
    });
    assert!(
        up.is_some(),
        "openvpn did not come up: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    p
}

fn no_probe_namespaces_left() {
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vpnlb-gwcheck-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "probe namespaces left behind: {left:?}");
}

#[test]
#[ignore = "needs root and the vpnlb binary: run cargo xtask test"]
fn settings_wrong_then_fixed_as_printed() {
    let bed = Bed::up("set");
    bed.gw.sh(
        "sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.all.arp_announce=0 net.ipv4.conf.all.rp_filter=1",
    );
    // L2 DSR: the ARP settings matter (the VIP's segment), decap does not.
    let (code, dsr) = bed.check(&["--encap", "none"]);
    assert_eq!(code, Some(1), "a fail must exit 1");
    for c in ["vip_address", "arp_ignore", "arp_announce", "rp_filter"] {
        assert_eq!(dsr.level(c), "fail", "{c}");
    }
    assert!(dsr.levels("decap").is_empty(), "L2 DSR needs no decap");
    assert_eq!(dsr.level("reply_source"), "warn", "no --port: not tested");
    // GUE: the LB reaches the gateway at its own address, so ARP only warns; decap is missing.
    let (code, gue) = bed.check(&["--encap", "gue"]);
    assert_eq!(code, Some(1));
    for (c, l) in [
        ("vip_address", "fail"),
        ("arp_ignore", "warn"),
        ("arp_announce", "warn"),
        ("rp_filter", "fail"),
        ("decap", "fail"),
        ("decap_gue_port", "fail"),
    ] {
        assert_eq!(gue.level(c), l, "{c}");
    }

    // Apply every fix exactly as printed (decap with this test's pin dir), after a typo.
    let pins = bed.pins.display().to_string();
    let (code, _, err) = vpnlb_in(
        bed.gw.name(),
        &[
            "decap",
            "attach",
            "--iface",
            "eht0",
            "--decap-pin-dir",
            &pins,
        ],
    );
    assert_eq!(code, Some(1), "attach to a missing interface: {err}");
    assert!(err.contains("no interface eht0"), "{err}");
    assert!(!bed.pins.exists(), "a failed attach left pins behind");
    let mut fixes: Vec<&str> = Vec::new();
    for x in dsr.list().iter().chain(gue.list()) {
        if let Some(fix) = x["fix"].as_str()
            && !fixes.contains(&fix)
        {
            fixes.push(fix);
        }
    }
    for fix in fixes {
        if let Some(args) = fix.strip_prefix("vpnlb ") {
            let mut a: Vec<&str> = args.split_whitespace().collect();
            a.extend(["--decap-pin-dir", &pins]);
            let (code, out, err) = vpnlb_in(bed.gw.name(), &a);
            assert_eq!(code, Some(0), "{fix}: {out}{err}");
        } else {
            bed.gw.sh(fix.split(" (persist").next().unwrap_or(fix));
        }
    }
    let (code, f) = bed.check(&["--encap", "gue"]);
    assert_eq!(code, Some(0), "after the fixes: {:#}", f.0);
    assert_eq!(f.count()["fail"], 0);
    for c in [
        "vip_address",
        "arp_ignore",
        "arp_announce",
        "rp_filter",
        "decap",
        "decap_gue_port",
    ] {
        assert_eq!(f.level(c), "ok", "{c}");
    }

    // rp_filter: the kernel applies max(all, eth0).
    bed.gw
        .sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=1");
    let (code, f) = bed.check(&["--encap", "gue"]);
    f.expect(code, 1, "rp_filter", "fail");
    bed.gw.sh("sysctl -qw net.ipv4.conf.all.rp_filter=2");
    let (code, f) = bed.check(&["--encap", "gue"]);
    f.expect(code, 0, "rp_filter", "ok");
    assert!(f.message("rp_filter").contains("loose"), "{:#}", f.0);

    // A GUE port other than the VIP's, then L2 DSR (no decap needed).
    let (code, f) = bed.check(&["--encap", "gue", "--gue-port", "7777"]);
    f.expect(code, 1, "decap_gue_port", "fail");
    // Attaching again swaps the program in place and takes the new port.
    let reattach = ["decap", "attach", "--iface", "eth0", "--gue-port", "7777"];
    let (code, out, err) = vpnlb_in(
        bed.gw.name(),
        &[&reattach[..], &["--decap-pin-dir", &pins]].concat(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("Replaced"),
        "re-attach adopts the pinned link: {out}"
    );
    let (code, f) = bed.check(&["--encap", "gue", "--gue-port", "7777"]);
    f.expect(code, 0, "decap_gue_port", "ok");
    let (code, _) = bed.check(&["--encap", "none"]);
    assert_eq!(code, Some(0));

    // The VIP on the Ethernet interface instead of lo: the host would answer ARP for it.
    bed.gw.sh(&format!(
        "ip addr del {VIP}/32 dev lo && ip addr add {VIP}/32 dev eth0"
    ));
    let (code, f) = bed.check(&[]);
    f.expect(code, 1, "vip_address", "fail");

    // Detaching the last interface removes the decap pins.
    let (code, _, err) = vpnlb_in(
        bed.gw.name(),
        &[
            "decap",
            "detach",
            "--iface",
            "eth0",
            "--decap-pin-dir",
            &pins,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!bed.pins.exists(), "decap pins left after the last detach");
}

#[test]
#[ignore = "needs root, openvpn and wireguard-go: run cargo xtask test"]
fn reply_source_own_address_fails_vip_passes() {
    let bed = Bed::up("rep");
    bed.right();

    // A UDP server bound to 0.0.0.0 answering without pktinfo: the kernel picks the own address.
    let any = Sink::start(&bed.gw, "any", SocketAddr::from(([0, 0, 0, 0], 7000)));
    let (code, f) = bed.check(&["--port", "7000"]);
    f.expect(code, 1, "reply_source", "fail");
    assert!(
        f.message("reply_source")
            .contains(&format!("from {OWN}:7000")),
        "{:#}",
        f.0
    );
    drop(any);
    // Bound to the VIP: replies from it.
    let _vip = Sink::start(&bed.gw, "vip", SocketAddr::from((VIP, 7001)));
    let (code, f) = bed.check(&["--port", "7001"]);
    f.expect(code, 0, "reply_source", "ok");

    // Policy routing by source port (the boringtun fix) sends replies out of eth0: the packet
    // socket sees them there. With `src VIP` in the table they are right, without it they are not.
    let _routed = Sink::start(&bed.gw, "routed", SocketAddr::from(([0, 0, 0, 0], 7002)));
    bed.gw.sh(
        "ip rule add ipproto udp sport 7002 lookup 100 && ip neigh replace 198.18.0.2 lladdr 02:00:00:00:00:01 dev eth0 nud permanent",
    );
    bed.gw.sh("ip route add 198.18.0.0/15 dev eth0 table 100");
    let (code, f) = bed.check(&["--port", "7002"]);
    f.expect(code, 1, "reply_source", "fail");
    assert!(
        f.message("reply_source")
            .contains(&format!("from {OWN}:7002 (leaving by eth0)")),
        "{:#}",
        f.0
    );
    bed.gw.sh(&format!(
        "ip route replace 198.18.0.0/15 dev eth0 src {VIP} table 100"
    ));
    let (code, f) = bed.check(&["--port", "7002"]);
    f.expect(code, 0, "reply_source", "ok");

    // OpenVPN: answers the hard reset from its own address unless --multihome.
    let reset = ["--port", "1194", "--udp-payload-hex", OPENVPN_RESET];
    let ovpn = openvpn(&bed, &[]);
    let (code, f) = bed.check(&reset);
    assert_eq!(code, Some(1));
    assert_eq!(f.level("reply_source"), "fail");
    assert_eq!(f.level("daemon"), "fail");
    assert!(
        f.list()
            .iter()
            .any(|x| x["fix"].as_str().is_some_and(|s| s.contains("--multihome"))),
        "{:#}",
        f.0
    );
    drop(ovpn);
    let ovpn = openvpn(&bed, &["--multihome"]);
    let (code, f) = bed.check(&reset);
    assert_eq!(code, Some(0), "{:#}", f.0);
    assert_eq!(f.level("reply_source"), "ok");
    assert_eq!(f.level("daemon"), "ok");
    drop(ovpn);

    // wireguard-go with the probe's key as a peer: a real handshake, answered from the VIP.
    let (server, probe, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let wg = WgDaemon::start(bed.gw.name(), "wgegc1", &bed.dir);
    wg.setconf(&format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.99.250.1/32\n",
        server.private, probe.public
    ));
    bed.gw.sh("ip link set wgegc1 up");
    let wg_args = |key: &str| -> Vec<String> {
        [
            "--port",
            "51820",
            "--wg-public-key",
            &server.public,
            "--wg-probe-private-key",
            key,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = wg_args(&probe.private);
    let (code, f) = bed.check(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{:#}", f.0);
    assert_eq!(f.level("reply_source"), "ok");
    assert!(f.message("reply_source").contains("handshake"), "{:#}", f.0);
    // It answers from the VIP, but handshakes it initiates after an unanswered one do not: a warning
    // with the policy-routing fix, ok once a rule gives its port the VIP (table 100 has a route
    // with `src VIP` from the part above).
    assert_eq!(f.level("daemon"), "warn", "{:#}", f.0);
    assert!(
        f.list()
            .iter()
            .any(|x| x["fix"].as_str().is_some_and(|s| s.contains("sport 51820"))),
        "{:#}",
        f.0
    );
    bed.gw.sh("ip rule add ipproto udp sport 51820 lookup 100");
    let (code, f) = bed.check(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{:#}", f.0);
    assert_eq!(f.level("reply_source"), "ok", "{:#}", f.0);
    assert_eq!(f.level("daemon"), "ok", "{:#}", f.0);
    bed.gw.sh("ip rule del ipproto udp sport 51820 lookup 100");
    // The same over IPv6: wireguard-go answers from the IPv6 VIP, a server on [::] does not.
    bed.gw.sh(&format!(
        "ip -6 addr add {VIP6}/128 dev lo && ip -6 addr add {OWN6}/64 dev eth0 nodad"
    ));
    let (code, f) = bed.check_vip(VIP6, &a.iter().map(String::as_str).collect::<Vec<_>>());
    f.expect(code, 0, "reply_source", "ok");
    assert!(
        f.levels("rp_filter").is_empty(),
        "IPv4 settings for an IPv6 VIP: {:#}",
        f.0
    );
    let any6 = Sink::start(&bed.gw, "any6", SocketAddr::from(([0u16; 8], 7010)));
    let (code, f) = bed.check_vip(VIP6, &["--port", "7010"]);
    f.expect(code, 1, "reply_source", "fail");
    assert!(
        f.message("reply_source")
            .contains(&format!("from [{OWN6}]:7010")),
        "{:#}",
        f.0
    );
    drop(any6);
    let vip6: std::net::Ipv6Addr = VIP6.parse().unwrap();
    let _vip6 = Sink::start(&bed.gw, "vip6", SocketAddr::from((vip6, 7011)));
    let (code, f) = bed.check_vip(VIP6, &["--port", "7011"]);
    f.expect(code, 0, "reply_source", "ok");

    // A key the gateway does not know draws no answer at all: a fail, not a pass.
    let a = wg_args(&stranger.private);
    let (code, f) = bed.check(&a.iter().map(String::as_str).collect::<Vec<_>>());
    f.expect(code, 1, "reply_source", "fail");
    drop(wg);

    // strongSwan: charon answers the IKEv2 probe (IKE_SA_INIT) from the VIP; gateway-check cannot
    // read its MOBIKE setting, so the daemon finding is a warning with the fix.
    let cdir = bed.dir.join("charon");
    let charon = Charon::start(bed.gw.name(), &cdir, "");
    charon.load(&gateway_conf(""));
    let (code, f) = bed.check(&["--port", "500"]);
    f.expect(code, 0, "reply_source", "ok");
    assert!(f.message("reply_source").contains("ikev2"), "{:#}", f.0);
    assert_eq!(f.level("daemon"), "warn");
    assert!(
        f.list()
            .iter()
            .any(|x| x["fix"].as_str().is_some_and(|s| s.contains("mobike = no"))),
        "{:#}",
        f.0
    );
    drop(charon);
    no_probe_namespaces_left();
}
