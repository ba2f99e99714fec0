//! Real OpenVPN gateways and clients (Debian `openvpn` 2.6 + `easy-rsa`) over the [`Topology`]:
//! - [`Pki::generate`]: a throw-away easy-rsa PKI per run (EC keys: under a second): one CA, one
//!   server certificate that every gateway shares (so any gateway accepts any client and the LB can
//!   move clients between them), one client certificate that all clients share (`duplicate-cn` on
//!   the gateways), and a `tls-crypt` key; [`Pki::hard_reset_probe`] records a client's first
//!   datagram, which makes a `udp` health check that only a running openvpn answers;
//! - every gateway runs `openvpn` in server mode on UDP VIP:51820 with `--multihome`, so it answers
//!   from the address the packet reached it at (the VIP, L2 DSR) instead of its own address, which
//!   the client would reject; its tun is 10.8.0.1 in every gateway, so a client that moves keeps its
//!   ping target; `keepalive 1 5` pushes `ping 1` / `ping-restart 5` to the clients, which bounds
//!   how long a client of a dead gateway waits before it reconnects (through the VIP, elsewhere);
//! - every client gets its own namespace cabled to the switch (an OpenVPN client owns its tun's
//!   10.8.0.0/24 route, so two clients in one namespace would fight over it), with its own source
//!   address and port (`--local`/`--lport`), the VIP routed to the LB, and nftables counters that
//!   split its UDP traffic into "to/from the VIP" and "to/from anywhere else";
//! - which gateway a client is on is read from the gateways' status files (`CLIENT_LIST` rows with
//!   the client's real address and peer id).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::wait_for;
use crate::netns::{Netns, cable};
use crate::testbed::{Topology, VIP, VIP_PORT};
use crate::wg::{Pinger, die_with_parent, run};

/// The gateways' tun address (the same in every gateway): what clients ping through the tunnel.
pub const GW_TUNNEL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 1);
/// `keepalive` of the gateways (seconds): pushed to clients as `ping` and `ping-restart`.
pub const PING_S: u32 = 1;
pub const PING_RESTART_S: u32 = 5;
/// First client source port (client `n` sends from `CLIENT_PORT0 + n`).
pub const CLIENT_PORT0: u16 = 40000;

/// Address of client `n` (each in its own namespace on the switch).
pub fn client_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 20 + n as u8)
}

/// The files of a throw-away PKI, in a scratch dir that the [`OvpnBed`] using it removes.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub tls_crypt: PathBuf,
}

impl Pki {
    /// easy-rsa in batch mode (EC P-256: no slow RSA or DH generation) and `openvpn --genkey
    /// tls-crypt`, in a fresh scratch dir named after `prefix`.
    pub fn generate(prefix: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("vpnlb-ovpn-{}-{prefix}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("openvpn scratch dir");
        let pki = dir.join("pki");
        let easyrsa = |args: &[&str]| {
            run(Command::new("/usr/share/easy-rsa/easyrsa")
                .args(args)
                .env("EASYRSA_PKI", &pki)
                .env("EASYRSA_BATCH", "1")
                .env("EASYRSA_ALGO", "ec")
                .env("EASYRSA_CURVE", "prime256v1")
                .current_dir(&dir))
            .unwrap_or_else(|e| panic!("easy-rsa (apt-get install easy-rsa): {e}"));
        };
        easyrsa(&["init-pki"]);
        easyrsa(&["--req-cn=vpnlb-test-ca", "build-ca", "nopass"]);
        easyrsa(&["build-server-full", "server", "nopass"]);
        easyrsa(&["build-client-full", "client", "nopass"]);
        let tls_crypt = dir.join("tls-crypt.key");
        run(Command::new("openvpn")
            .args(["--genkey", "tls-crypt"])
            .arg(&tls_crypt))
        .unwrap_or_else(|e| panic!("openvpn --genkey (apt-get install openvpn): {e}"));
        Pki {
            dir,
            ca: pki.join("ca.crt"),
            server_cert: pki.join("issued/server.crt"),
            server_key: pki.join("private/server.key"),
            client_cert: pki.join("issued/client.crt"),
            client_key: pki.join("private/client.key"),
            tls_crypt,
        }
    }
}

impl Pki {
    /// The first datagram a client of this PKI sends: its P_CONTROL_HARD_RESET_CLIENT_V2, wrapped
    /// with the tls-crypt key. Recorded from a real `openvpn` client pointed at a UDP socket of ours
    /// (in a throw-away namespace `<prefix>-rec`). A gateway answers this datagram, replayed as is
    /// and as often as wanted, with a P_CONTROL_HARD_RESET_SERVER_V2 and keeps no state (openvpn 2.6
    /// resets are stateless until the client's third packet; verified also 75 s after recording,
    /// beyond hand-window) — but only while its event loop runs: as the payload of a `udp` health
    /// check it tells a live openvpn from a dead, stopped or wedged one, and needs no key in the agent.
    pub fn hard_reset_probe(&self, prefix: &str) -> Vec<u8> {
        let ns = Netns::new(&format!("{prefix}-rec"));
        let sock = ns.run(|| UdpSocket::bind("127.0.0.1:0").expect("bind recorder"));
        let at = sock.local_addr().expect("recorder address");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let conf = client_conf(self, at, "nobind\n");
        let mut client = OvpnDaemon::start(ns.name(), "recorder", &conf, &self.dir);
        let mut buf = [0u8; 2048];
        let got = sock.recv_from(&mut buf);
        client.kill();
        let (n, _) = got.unwrap_or_else(|e| {
            panic!(
                "no datagram from the recording openvpn client: {e}\n{}",
                client.log_text()
            )
        });
        // Opcode in the top 5 bits: 7 = P_CONTROL_HARD_RESET_CLIENT_V2.
        assert_eq!(buf[0] >> 3, 7, "not a hard reset: {:02x?}", &buf[..n]);
        buf[..n].to_vec()
    }
}

/// One `openvpn --config FILE` in a namespace (entered with nsenter, which execs it: the child's PID
/// is the daemon's), logging to a file, killed by PID on drop.
pub struct OvpnDaemon {
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl OvpnDaemon {
    /// Writes `conf` to `DIR/NAME.conf` and starts it in `ns`.
    pub fn start(ns: &str, name: &str, conf: &str, dir: &Path) -> OvpnDaemon {
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, conf).expect("write openvpn config");
        let log = dir.join(format!("{name}.log"));
        let f = File::create(&log).expect("openvpn log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("openvpn")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("spawn openvpn (apt-get install openvpn)");
        OvpnDaemon {
            config,
            log,
            child: Some(child),
        }
    }

    /// The daemon's PID while it runs (not killed yet).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (e.g. SIGSTOP to wedge it) to the daemon's PID.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("openvpn not running").id();
        // SAFETY: kill(2) on our own child's PID.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "kill {sig}: {}", std::io::Error::last_os_error());
    }

    /// SIGKILL by PID and reap (also when stopped).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log containing `what`.
    pub fn count(&self, what: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(what)).count()
    }
}

impl Drop for OvpnDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One connected client as a gateway's status file lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct OvpnSession {
    /// Where the gateway sees the client (its own address: DSR keeps it).
    pub real: SocketAddr,
    pub virt: Ipv4Addr,
    /// When the session was established (epoch seconds).
    pub since: u64,
    /// The P_DATA_V2 peer id the gateway gave this client.
    pub peer_id: u32,
}

/// The `CLIENT_LIST` rows of a complete `status-version 2` file (None while it is being rewritten
/// or absent).
pub fn read_status(path: &Path) -> Option<Vec<OvpnSession>> {
    let text = std::fs::read_to_string(path).ok()?;
    if !text.trim_end().ends_with("END") {
        return None;
    }
    Some(
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                if f.first() != Some(&"CLIENT_LIST") || f.len() < 12 {
                    return None;
                }
                Some(OvpnSession {
                    real: f[2].parse().ok()?,
                    virt: f[3].parse().ok()?,
                    since: f[8].parse().ok()?,
                    peer_id: f[11].parse().ok()?,
                })
            })
            .collect(),
    )
}

/// A gateway's `openvpn` server.
pub struct OvpnGateway {
    pub daemon: OvpnDaemon,
    pub status: PathBuf,
}

impl OvpnGateway {
    /// The current sessions (waits up to 2 s for a complete status file; empty if there is none).
    pub fn sessions(&self) -> Vec<OvpnSession> {
        wait_for(Duration::from_secs(2), || read_status(&self.status)).unwrap_or_default()
    }
}

/// One client in its own namespace.
pub struct OvpnClient {
    pub n: usize,
    pub addr: Ipv4Addr,
    pub port: u16,
    // Field order is drop order: the daemon dies before its namespace.
    pub daemon: OvpnDaemon,
    pub ns: Netns,
}

impl OvpnClient {
    pub fn underlay(&self) -> SocketAddr {
        SocketAddr::from((self.addr, self.port))
    }

    /// The client's UDP packets so far: (to the VIP, from the VIP, to elsewhere, from elsewhere).
    pub fn udp_counters(&self) -> VipCounters {
        let text = self.ns.sh("nft -j list counters table inet vpnlb_ovp");
        let v: Value = serde_json::from_str(&text).expect("nft -j output");
        let mut m = BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let c = &item["counter"];
            if let Some(name) = c["name"].as_str() {
                m.insert(name.to_string(), c["packets"].as_u64().unwrap_or(0));
            }
        }
        let get = |k: &str| m.get(k).copied().unwrap_or(0);
        VipCounters {
            to_vip: get("to_vip"),
            from_vip: get("from_vip"),
            to_other: get("to_other"),
            from_other: get("from_other"),
        }
    }
}

impl OvpnClient {
    /// Acts as a NAT in front of the client that rebinds it to public port `port`: from now on its
    /// packets leave from `port` and the replies to `port` are rewritten back (stateless nftables
    /// rewrites after the counters on the way out, before conntrack on the way in), so openvpn on
    /// the client does not notice; its gateway sees the client at a new address.
    pub fn rebind(&self, port: u16) {
        self.ns.sh(&format!(
            "nft -f - <<'EOF'
table inet vpnlb_ovp_nat {{
  chain out {{
    type filter hook output priority 100;
    udp sport {own} udp sport set {port}
  }}
  chain in {{
    type filter hook prerouting priority -300;
    udp dport {port} udp dport set {own}
  }}
}}
EOF",
            own = self.port
        ));
    }
}

/// Packet counts of a client's OpenVPN socket, split by whether the peer is the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipCounters {
    pub to_vip: u64,
    pub from_vip: u64,
    pub to_other: u64,
    pub from_other: u64,
}

/// The OpenVPN layer over a [`Topology`] (whose echo sinks must be gone: they hold VIP:51820).
/// Drop it before the topology.
pub struct OvpnBed {
    // Field order is drop order: clients (and their namespaces), then gateways.
    pub clients: Vec<OvpnClient>,
    pub gws: Vec<OvpnGateway>,
    pub pki: Pki,
    /// Namespace prefix of the clients.
    pub prefix: String,
    pub dir: PathBuf,
    /// Gateways, and clients until each completed its first connection.
    pub setup: Duration,
    /// The gateways' UDP port (the VIP's port).
    pub port: u16,
    /// Number of the first client: client `k` gets [`client_addr`]`(k)`, so a testbed that has
    /// other clients on the switch starts past them.
    pub first_client: usize,
}

impl OvpnBed {
    /// Starts one server per gateway namespace with `pki` (clients: [`OvpnBed::connect`], once the
    /// agent has every gateway up, so the first packets meet the full ring). Client namespaces are
    /// named `<prefix>-c<n>`.
    pub fn up(topo: &Topology, prefix: &str, pki: Pki) -> OvpnBed {
        OvpnBed::up_on(topo, prefix, pki, VIP_PORT)
    }

    /// [`OvpnBed::up`] with the gateways on UDP `port` instead of 51820 (next to WireGuard).
    pub fn up_on(topo: &Topology, prefix: &str, pki: Pki, port: u16) -> OvpnBed {
        let t0 = Instant::now();
        assert!(
            topo.sinks.is_empty(),
            "clear the topology's echo sinks first (they hold VIP:51820)"
        );
        let dir = pki.dir.clone();
        let gws = topo
            .gws
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let status = dir.join(format!("gw{}.status", i + 1));
                let conf = gateway_conf(&pki, i, &status, port);
                OvpnGateway {
                    daemon: OvpnDaemon::start(ns.name(), &format!("gw{}", i + 1), &conf, &dir),
                    status,
                }
            })
            .collect();
        OvpnBed {
            clients: Vec::new(),
            gws,
            pki,
            prefix: prefix.to_string(),
            dir,
            setup: t0.elapsed(),
            port,
            first_client: 0,
        }
    }

    /// Starts `n` more clients (client `k` in namespace `<prefix>-c<k>`, cabled to the topology's
    /// switch) and waits until every one has completed its connection. Adds the time to `setup`.
    pub fn connect(&mut self, topo: &Topology, n: usize) {
        let t0 = Instant::now();
        let lb_mac = crate::netns::fmt_mac(&topo.lb_mac);
        let first = self.first_client + self.clients.len();
        for k in first..first + n {
            let ns = Netns::new(&format!("{}-c{k}", self.prefix));
            let addr = client_addr(k);
            let port = CLIENT_PORT0 + k as u16;
            cable(&topo.sw, &format!("oc{k}"), &ns, &format!("{addr}/24"));
            // The VIP is routed to the LB (a static neighbour entry), and the counters.
            ns.sh(&format!(
                "ip neigh replace {VIP} lladdr {lb_mac} dev eth0 nud permanent && nft -f - <<'EOF'\n{}\nEOF",
                counters_ruleset(port, self.port)
            ));
            let daemon = OvpnDaemon::start(
                ns.name(),
                &format!("client{k}"),
                &client_conf(
                    &self.pki,
                    SocketAddr::from((VIP, self.port)),
                    &format!("local {addr}\nlport {port}\n"),
                ),
                &self.dir,
            );
            self.clients.push(OvpnClient {
                n: k,
                addr,
                port,
                daemon,
                ns,
            });
        }
        let connected = |c: &OvpnClient| c.daemon.count("Initialization Sequence Completed") > 0;
        if wait_for(Duration::from_secs(30), || {
            self.clients.iter().all(connected).then_some(())
        })
        .is_none()
        {
            let stuck: Vec<usize> = self
                .clients
                .iter()
                .filter(|c| !connected(c))
                .map(|c| c.n)
                .collect();
            panic!(
                "OpenVPN clients {stuck:?} not connected within 30 s:\n{}",
                self.logs()
            );
        }
        self.setup += t0.elapsed();
    }

    /// For each client: the gateways among `gws` that list it (by its real address), with the session.
    pub fn placement(&self, gws: &[usize]) -> Vec<Vec<(usize, OvpnSession)>> {
        let tables: Vec<(usize, Vec<OvpnSession>)> =
            gws.iter().map(|&g| (g, self.gws[g].sessions())).collect();
        self.clients
            .iter()
            .map(|c| {
                tables
                    .iter()
                    .filter_map(|(g, t)| {
                        t.iter()
                            .find(|s| s.real == c.underlay())
                            .map(|s| (*g, s.clone()))
                    })
                    .collect()
            })
            .collect()
    }

    /// Kills gateway `g`'s `openvpn` with SIGKILL.
    pub fn kill_gateway(&mut self, g: usize) {
        self.gws[g].daemon.kill();
    }

    /// A steady ping from every client to [`GW_TUNNEL_ADDR`] through its tunnel.
    pub fn ping_all(&self, interval: Duration) -> Vec<Pinger> {
        self.clients
            .iter()
            .map(|c| Pinger::start(c.ns.name(), GW_TUNNEL_ADDR, interval, &self.dir, c.n))
            .collect()
    }

    /// Every client's and gateway's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, g) in self.gws.iter().enumerate() {
            s.push_str(&format!("--- gw{} ---\n{}\n", i + 1, g.daemon.log_text()));
        }
        for c in &self.clients {
            s.push_str(&format!(
                "--- client {} ---\n{}\n",
                c.n,
                c.daemon.log_text()
            ));
        }
        s
    }
}

impl Drop for OvpnBed {
    fn drop(&mut self) {
        self.clients.clear();
        self.gws.clear();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A gateway's server config: shared certificate, tls-crypt, UDP 51820 on every address with
/// `multihome` (replies leave from the VIP the client sent to), one client certificate for all
/// (`duplicate-cn`), status file rewritten every second.
fn gateway_conf(pki: &Pki, i: usize, status: &Path, port: u16) -> String {
    format!(
        "dev ovpg{n}\ndev-type tun\nproto udp\nport {port}\nmultihome\n\
         server 10.8.0.0 255.255.255.0\ntopology subnet\n\
         ca {ca}\ncert {cert}\nkey {key}\ndh none\ntls-crypt {tc}\nduplicate-cn\n\
         keepalive {PING_S} {PING_RESTART_S}\nstatus {status} 1\nstatus-version 2\nverb 3\n",
        n = i + 1,
        ca = pki.ca.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        tc = pki.tls_crypt.display(),
        status = status.display(),
    )
}

/// A client config for `remote` (the VIP), with `bind` (`local`/`lport`, or `nobind`); `ping 1` /
/// `ping-restart 5` come pushed by the gateway.
fn client_conf(pki: &Pki, remote: SocketAddr, bind: &str) -> String {
    format!(
        "client\ndev ovpc\ndev-type tun\nproto udp\nremote {} {}\n{bind}\
         ca {ca}\ncert {cert}\nkey {key}\ntls-crypt {tc}\nremote-cert-tls server\nverb 3\n",
        remote.ip(),
        remote.port(),
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
        tc = pki.tls_crypt.display(),
    )
}

/// nftables counters of the client's socket (source/destination port `port`): to/from the VIP and
/// to/from anywhere else (a client that roamed away from the LB).
fn counters_ruleset(port: u16, vip_port: u16) -> String {
    format!(
        "table inet vpnlb_ovp {{
  counter to_vip {{}}
  counter from_vip {{}}
  counter to_other {{}}
  counter from_other {{}}
  chain out {{
    type filter hook output priority 0;
    udp sport {port} ip daddr {VIP} udp dport {vip_port} counter name to_vip
    udp sport {port} ip daddr != {VIP} counter name to_other
  }}
  chain in {{
    type filter hook input priority 0;
    udp dport {port} ip saddr {VIP} udp sport {vip_port} counter name from_vip
    udp dport {port} ip saddr != {VIP} counter name from_other
  }}
}}"
    )
}

/// Lower-case hex of `bytes` (a `udp` check's `payload_hex`, `gateway-check --udp-payload-hex`).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `[[backend.check]]` of type `udp` on the gateway's openvpn (its own address, port 51820) that
/// sends `probe` (a recorded client hard reset, [`Pki::hard_reset_probe`]) and wants any answer,
/// with the agent tests' timing: only a running openvpn answers it.
pub fn hard_reset_check(probe: &[u8]) -> String {
    use crate::agent::{FALL, INTERVAL_MS, RISE, TIMEOUT_MS};
    format!(
        "[[backend.check]]\ntype = \"udp\"\nport = {VIP_PORT}\npayload_hex = \"{}\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n\n",
        hex(probe)
    )
}
