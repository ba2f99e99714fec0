//! Real WireGuard gateways and clients (Debian `wireguard-go` + `wireguard-tools`, and `ping` from
//! iputils) in the [`Topology`]'s namespaces:
//! - every gateway runs `wireguard-go` with the SAME server key on port 51820 and lists every client
//!   as a peer, so any gateway accepts any client (the LB can move clients between them);
//! - every client address of the client namespace gets its own interface (`<client_prefix><n>`),
//!   its own key, listen port `51900 + n` and fwmark (policy routing picks the client's own source
//!   address), endpoint = VIP:51820 and PersistentKeepalive;
//! - tunnel addressing: client `n` is `10.99.1.(n+1)/32` and talks to `10.98.(n+1).1`, which every
//!   gateway answers (a local route for 10.98.0.0/16), so a client that moves to another gateway keeps
//!   its target;
//! - [`WgDaemon`] runs `wireguard-go -f` under `nsenter` and kills it by PID on drop; the UAPI socket
//!   (/var/run/wireguard/IF.sock) is global, so interface names are unique across namespaces and `wg`
//!   runs from anywhere; the test creates that socket, already listening, and hands it to the
//!   daemon (`WG_UAPI_FD`): `wg` unlinks a socket that is bound but not yet listening;
//! - [`dump`] reads `wg show IF dump` (endpoint, latest handshake) to see which gateway a client
//!   landed on; [`Pinger`] runs a steady `ping -D` through a tunnel and counts replies by sequence.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::wait_for;
use crate::testbed::{Topology, VIP, VIP_PORT};

/// First listen port of the client interfaces (client `n` listens on `CLIENT_PORT0 + n`).
pub const CLIENT_PORT0: u16 = 51900;
/// PersistentKeepalive of the clients (seconds).
pub const KEEPALIVE: u32 = 5;

/// Tunnel address of client `n` (0-based).
pub fn client_tunnel_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 1, n as u8 + 1)
}

/// The address client `n` pings through its tunnel (every gateway answers it).
pub fn client_target(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 98, n as u8 + 1, 1)
}

/// Seconds since the epoch, as `wg show dump` and `ping -D` print them.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Runs a command to completion: its stdout, or Err naming it with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A WireGuard key pair (base64, as `wg` prints them).
#[derive(Debug, Clone)]
pub struct Keypair {
    pub private: String,
    pub public: String,
}

impl Keypair {
    /// `wg genkey` | `wg pubkey`.
    pub fn generate() -> Keypair {
        let private = run(Command::new("wg").arg("genkey"))
            .expect("wg genkey (apt-get install wireguard-tools)")
            .trim()
            .to_string();
        let mut c = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg pubkey");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(private.as_bytes())
            .expect("write key");
        let out = c.wait_with_output().expect("wg pubkey");
        assert!(out.status.success(), "wg pubkey failed");
        Keypair {
            private,
            public: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// Whether the UAPI socket of `ifname` accepts connections, i.e. it is listening. A plain
/// connect, which leaves the socket file alone whatever the answer (`wg` unlinks a socket that
/// refuses it): wait with this, never with `wg`, for a `wireguard-go` that opens its own socket.
pub fn uapi_listening(ifname: &str) -> bool {
    std::os::unix::net::UnixStream::connect(uapi_socket(ifname)).is_ok()
}

/// The descriptor [`WgDaemon`] hands its UAPI socket over on (`WG_UAPI_FD`).
const UAPI_FD: RawFd = 3;

/// A listening UAPI socket at `path` that is never seen unready: bound and listening under a name
/// `wg` never looks at (not `*.sock`), then renamed into place (rename(2) is atomic).
fn listening_uapi_socket(path: &Path) -> UnixListener {
    let dir = path.parent().expect("socket directory");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let tmp = path.with_extension("starting");
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).unwrap_or_else(|e| panic!("bind {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
    l
}

/// Gives the child `fd` as descriptor [`UAPI_FD`], open across exec.
fn hand_over(cmd: &mut Command, fd: RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == UAPI_FD {
                // dup2 onto itself would keep FD_CLOEXEC.
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 {
                    flags
                } else {
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC)
                }
            } else {
                libc::dup2(fd, UAPI_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets PR_SET_PDEATHSIG so a child dies with the thread that started it.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One `wireguard-go -f IFNAME` in a namespace, killed by PID on drop.
pub struct WgDaemon {
    pub ns: String,
    pub ifname: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl WgDaemon {
    /// Starts `wireguard-go` in namespace `ns` (entered with nsenter, which execs it: the child's
    /// PID is the daemon's) on a UAPI socket created here, and waits until `wg show` reads it.
    ///
    /// wireguard-go left to itself creates the socket file with bind(2) and calls listen(2) just
    /// after, and `wg` takes a refused connect (ECONNREFUSED) for the socket of a dead daemon and
    /// unlinks the file. A `wg` that lands between the two calls (a loaded machine preempts the
    /// daemon there; this one polled `wg show` every 10 ms) removes the fresh socket, and
    /// wireguard-go exits when it then puts an inotify watch on the path: "Failed to listen on
    /// uapi socket: no such file or directory". So the socket is made here, listening before its
    /// name appears ([`listening_uapi_socket`]), and handed over with `WG_UAPI_FD` (wireguard-go's
    /// own way, from its daemonizing). From then on only the daemon holds it: it accepts (`wg`
    /// waits for it to serve) or, once the daemon is gone, refuses.
    pub fn start(ns: &str, ifname: &str, log_dir: &Path) -> WgDaemon {
        assert!(ifname.len() <= 15, "interface name too long: {ifname}");
        let sock = uapi_socket(ifname);
        // Unique names: a socket file left here belongs to a killed run of ours.
        let _ = std::fs::remove_file(&sock);
        let uapi = listening_uapi_socket(&sock);
        let log = log_dir.join(format!("{ifname}.log"));
        let f = File::create(&log).expect("daemon log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .args(["wireguard-go", "-f", ifname])
            .env("LOG_LEVEL", "error")
            .env("WG_UAPI_FD", UAPI_FD.to_string())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f);
        die_with_parent(&mut cmd);
        hand_over(&mut cmd, uapi.as_raw_fd());
        let child = cmd
            .spawn()
            .expect("spawn wireguard-go (apt-get install wireguard-go)");
        drop(uapi);
        let mut d = WgDaemon {
            ns: ns.to_string(),
            ifname: ifname.to_string(),
            log,
            child: Some(child),
        };
        let ok = wait_for(Duration::from_secs(10), || {
            if !d.alive() {
                return Some(false);
            }
            run(Command::new("wg").args(["show", ifname]))
                .ok()
                .map(|_| true)
        });
        assert_eq!(
            ok,
            Some(true),
            "wireguard-go {ifname} in {ns} did not come up: {}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
        d
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGKILL by PID and reap.
    pub fn kill(&mut self) {
        // Only the socket of a daemon we killed here: a restarted one reuses the name.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(uapi_socket(&self.ifname));
        }
    }

    /// `wg setconf IF FILE` with `conf` written to FILE next to the log.
    pub fn setconf(&self, conf: &str) {
        let path = self.log.with_extension("conf");
        std::fs::write(&path, conf).expect("write wg config");
        run(Command::new("wg")
            .arg("setconf")
            .arg(&self.ifname)
            .arg(&path))
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for WgDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Policy routing on a gateway: WireGuard packets (UDP source port 51820) leave from the VIP even
/// when `wireguard-go` has no remembered source. It forgets it on purpose when a handshake it
/// retries goes unanswered (after ~15 s of sending without receiving); without this, a gateway taken
/// out of the pool but still alive (black-holed, or back after a flap) then initiates a handshake
/// from its own address, and since every gateway has the same key, its former clients accept it and
/// roam past the LB for good (found by `cargo xtask drill`). Replies to packets sent to the
/// gateway's own address (the agent's probes) keep that address: wireguard-go sets it explicitly.
/// Idempotent (a restarted gateway runs it again).
pub fn source_from_vip() -> String {
    format!(
        "ip route replace 10.77.0.0/24 dev eth0 src {VIP} table 100 && (ip rule del ipproto udp sport {VIP_PORT} lookup 100 2>/dev/null || true) && ip rule add ipproto udp sport {VIP_PORT} lookup 100"
    )
}

/// A gateway's `wireguard-go` in `ns`: configured with `conf`, its tun up, routes to the clients'
/// tunnel addresses, the clients' targets (10.98.0.0/16) answered locally, and its WireGuard
/// packets leaving from the VIP ([`source_from_vip`]).
fn gateway(ns: &crate::netns::Netns, ifname: &str, conf: &str, dir: &Path) -> WgDaemon {
    ns.sh("sysctl -qw net.ipv4.conf.default.rp_filter=0");
    let d = WgDaemon::start(ns.name(), ifname, dir);
    d.setconf(conf);
    ns.sh(&format!(
        "ip link set {ifname} up && ip route replace 10.99.1.0/24 dev {ifname} && ip route replace local 10.98.0.0/16 dev lo && {}",
        source_from_vip()
    ));
    d
}

/// One peer line of `wg show IF dump`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    pub public: String,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the epoch, 0 = never.
    pub latest_handshake: u64,
    pub rx: u64,
    pub tx: u64,
}

/// The peers of interface `ifname` (empty if the daemon is gone).
pub fn dump(ifname: &str) -> Vec<PeerInfo> {
    let Ok(text) = run(Command::new("wg").args(["show", ifname, "dump"])) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() < 8 {
                return None;
            }
            Some(PeerInfo {
                public: f[0].to_string(),
                endpoint: f[2].parse().ok(),
                latest_handshake: f[4].parse().unwrap_or(0),
                rx: f[5].parse().unwrap_or(0),
                tx: f[6].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// One client tunnel.
#[derive(Debug, Clone)]
pub struct WgClient {
    pub n: usize,
    pub ifname: String,
    pub keys: Keypair,
    /// Underlay source address and port (what the gateways must see as the endpoint).
    pub addr: Ipv4Addr,
    pub port: u16,
    pub tunnel_addr: Ipv4Addr,
    pub target: Ipv4Addr,
}

impl WgClient {
    pub fn underlay(&self) -> SocketAddr {
        SocketAddr::from((self.addr, self.port))
    }

    /// The fwmark of its interface (policy routing picks its own source address by it).
    pub fn fwmark(&self) -> usize {
        0x1000 + self.n
    }

    /// The routing table that its fwmark selects.
    pub fn table(&self) -> usize {
        1000 + self.n
    }

    /// Shell lines for the client namespace: its fwmark looks up a table that sends from `addr`.
    fn policy_routing(&self) -> String {
        format!(
            "ip rule add fwmark {mark:#x} lookup {table} && ip route add 10.77.0.0/24 dev eth0 src {a} table {table}\n",
            mark = self.fwmark(),
            table = self.table(),
            a = self.addr
        )
    }

    /// Its `wg setconf` text: own key, port and fwmark, the gateways' key behind the VIP.
    fn conf(&self, server: &Keypair) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {}\nFwMark = {:#x}\n\n[Peer]\nPublicKey = {}\nEndpoint = {VIP}:{VIP_PORT}\nAllowedIPs = {}/24\nPersistentKeepalive = {KEEPALIVE}\n",
            self.keys.private,
            self.port,
            self.fwmark(),
            server.public,
            self.target_net(),
        )
    }

    fn target_net(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.target) & 0xffff_ff00)
    }

    /// Shell line: tunnel address, link up, route to its target through the tunnel.
    fn tunnel_setup(&self) -> String {
        format!(
            "ip addr add {ta}/32 dev {ifn} && ip link set {ifn} up && ip route add {net}/24 dev {ifn}\n",
            ta = self.tunnel_addr,
            ifn = self.ifname,
            net = self.target_net(),
        )
    }

    /// Its `[Peer]` section in the gateways' config.
    fn gateway_peer(&self) -> String {
        format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            self.keys.public, self.tunnel_addr
        )
    }
}

/// The WireGuard layer over a [`Topology`]: one `wireguard-go` per gateway (same key), one per
/// client address. Drop it before the topology (daemons die first).
pub struct WgBed {
    /// The `wg setconf` text of every gateway.
    pub gw_conf: String,
    pub server: Keypair,
    pub clients: Vec<WgClient>,
    pub client_ns: String,
    /// `wireguard-go` of gateway i (index as in the topology).
    pub gws: Vec<WgDaemon>,
    pub client_daemons: Vec<WgDaemon>,
    pub dir: PathBuf,
    /// How long bringing everything up took.
    pub setup: Duration,
}

impl WgBed {
    /// Brings up WireGuard on every gateway (`<gw_prefix><i+1>`) and one client interface per
    /// client address (`<client_prefix><n>`). The topology's UDP echo sinks (on VIP:51820) must be
    /// gone (`topo.sinks.clear()`). Tunnels carry traffic once something is sent (or keepalives).
    pub fn up(topo: &Topology, gw_prefix: &str, client_prefix: &str) -> WgBed {
        let t0 = Instant::now();
        assert!(
            topo.sinks.is_empty(),
            "clear the topology's echo sinks first (they hold VIP:51820)"
        );
        let dir = std::env::temp_dir().join(format!("vpnlb-wg-{}-{gw_prefix}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("wg scratch dir");
        let server = Keypair::generate();
        let clients: Vec<WgClient> = topo
            .client_addrs
            .iter()
            .enumerate()
            .map(|(n, a)| WgClient {
                n,
                ifname: format!("{client_prefix}{n}"),
                keys: Keypair::generate(),
                addr: *a,
                port: CLIENT_PORT0 + n as u16,
                tunnel_addr: client_tunnel_addr(n),
                target: client_target(n),
            })
            .collect();

        // Gateways: same key, same port, every client a peer.
        let mut gw_conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {VIP_PORT}\n",
            server.private
        );
        for c in &clients {
            gw_conf.push_str(&c.gateway_peer());
        }
        let gws = topo
            .gws
            .iter()
            .enumerate()
            .map(|(i, ns)| gateway(ns, &format!("{gw_prefix}{}", i + 1), &gw_conf, &dir))
            .collect();

        // Clients: own key, port, fwmark (→ own source address), endpoint = the VIP.
        topo.client
            .sh("sysctl -qw net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.rp_filter=0");
        // Policy routing first: each client's fwmark picks its own source address (so even the
        // first handshake leaves from it).
        let rules: String = clients.iter().map(WgClient::policy_routing).collect();
        topo.client.sh(&format!("set -e\n{rules}"));
        let mut client_daemons = Vec::new();
        let mut script = String::new();
        for c in &clients {
            let d = WgDaemon::start(topo.client.name(), &c.ifname, &dir);
            d.setconf(&c.conf(&server));
            script.push_str(&c.tunnel_setup());
            client_daemons.push(d);
        }
        topo.client.sh(&format!("set -e\n{script}"));
        WgBed {
            gw_conf,
            server,
            clients,
            client_ns: topo.client.name().to_string(),
            gws,
            client_daemons,
            dir,
            setup: t0.elapsed(),
        }
    }

    /// The peer table of gateway `g` (empty once it is dead).
    pub fn gw_peers(&self, g: usize) -> Vec<PeerInfo> {
        dump(&self.gws[g].ifname)
    }

    /// The client's view of its one peer (the gateways' key behind the VIP).
    pub fn client_peer(&self, n: usize) -> Option<PeerInfo> {
        dump(&self.clients[n].ifname).into_iter().next()
    }

    /// For each client: (gateway index, its peer entry) of every gateway in `gws` that has completed
    /// a handshake with it.
    pub fn placement(&self, gws: &[usize]) -> Vec<Vec<(usize, PeerInfo)>> {
        let tables: Vec<(usize, Vec<PeerInfo>)> =
            gws.iter().map(|&g| (g, self.gw_peers(g))).collect();
        self.clients
            .iter()
            .map(|c| {
                tables
                    .iter()
                    .filter_map(|(g, t)| {
                        t.iter()
                            .find(|p| p.public == c.keys.public && p.latest_handshake > 0)
                            .map(|p| (*g, p.clone()))
                    })
                    .collect()
            })
            .collect()
    }

    /// Starts gateway `g`'s `wireguard-go` again (after [`WgBed::kill_gateway`]).
    pub fn restart_gateway(&mut self, topo: &Topology, g: usize) {
        let ifname = self.gws[g].ifname.clone();
        self.gws[g].kill();
        let fresh = gateway(&topo.gws[g], &ifname, &self.gw_conf, &self.dir);
        // The old one (already reaped) is dropped here without touching the new socket.
        drop(std::mem::replace(&mut self.gws[g], fresh));
    }

    /// Adds a client (a new user) after start-up, on address `addr` (added to the client
    /// namespace) with interface `<client_prefix><n>`, `n` = the next index: its peer goes into
    /// every running gateway (`wg set`) and into `gw_conf` (a restarted gateway keeps it). Returns `n`.
    pub fn add_client(&mut self, topo: &Topology, client_prefix: &str, addr: Ipv4Addr) -> usize {
        let n = self.clients.len();
        let c = WgClient {
            n,
            ifname: format!("{client_prefix}{n}"),
            keys: Keypair::generate(),
            addr,
            port: CLIENT_PORT0 + n as u16,
            tunnel_addr: client_tunnel_addr(n),
            target: client_target(n),
        };
        for g in self.gws.iter_mut().filter_map(|g| g.alive().then_some(&*g)) {
            run(Command::new("wg").args([
                "set",
                &g.ifname,
                "peer",
                &c.keys.public,
                "allowed-ips",
                &format!("{}/32", c.tunnel_addr),
            ]))
            .unwrap_or_else(|e| panic!("{e}"));
        }
        self.gw_conf.push_str(&c.gateway_peer());
        topo.client.sh(&format!(
            "set -e\nip addr add {addr}/24 dev eth0\n{}",
            c.policy_routing()
        ));
        let d = WgDaemon::start(topo.client.name(), &c.ifname, &self.dir);
        d.setconf(&c.conf(&self.server));
        topo.client.sh(&format!("set -e\n{}", c.tunnel_setup()));
        self.clients.push(c);
        self.client_daemons.push(d);
        n
    }

    /// Kills gateway `g`'s `wireguard-go` (by PID).
    pub fn kill_gateway(&mut self, g: usize) {
        self.gws[g].kill();
    }

    /// A steady ping through every client's tunnel, `interval` apart.
    pub fn ping_all(&self, interval: Duration) -> Vec<Pinger> {
        self.clients
            .iter()
            .map(|c| Pinger::start(&self.client_ns, c.target, interval, &self.dir, c.n))
            .collect()
    }
}

impl Drop for WgBed {
    fn drop(&mut self) {
        self.client_daemons.clear();
        self.gws.clear();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `ping -n -D -i INTERVAL TARGET` in a namespace, output to a file; stopped with SIGINT.
pub struct Pinger {
    pub target: Ipv4Addr,
    out: PathBuf,
    child: Option<Child>,
}

/// The "healthy tunnels lose nothing" check of the failover and drain tests: every client in
/// `clients` got ping replies after epoch time `t` and lost none of its requests since (`owner[n]`,
/// the index of client `n`'s gateway, names it in the message). Returns how many requests that
/// covers in all.
pub fn assert_no_loss_after(logs: &[PingLog], clients: &[usize], owner: &[usize], t: f64) -> usize {
    let mut span_total = 0;
    for &n in clients {
        let (lost, span) = logs[n].lost_after(t);
        assert!(span > 0, "client {n}: no ping reply after the fault");
        assert_eq!(
            lost,
            0,
            "client {n} on gw{} lost {lost} of {span} pings",
            owner[n] + 1
        );
        span_total += span;
    }
    span_total
}

/// What a [`Pinger`] saw: the replies (sequence number, receive time in epoch seconds).
#[derive(Debug, Clone, Default)]
pub struct PingLog {
    pub replies: Vec<(u32, f64)>,
}

impl Pinger {
    pub fn start(ns: &str, target: Ipv4Addr, interval: Duration, dir: &Path, tag: usize) -> Pinger {
        let out = dir.join(format!("ping-{tag}-{target}.txt"));
        let f = File::create(&out).expect("ping output");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .args(["ping", "-n", "-D", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg(target.to_string())
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("spawn ping (apt-get install iputils-ping)");
        Pinger {
            target,
            out,
            child: Some(child),
        }
    }

    /// The replies so far (ping writes a line per reply as it comes; the pinger keeps running).
    pub fn log(&self) -> PingLog {
        PingLog::parse(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }

    /// SIGINT (ping flushes its output), wait, parse.
    pub fn stop(&mut self) -> PingLog {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            if wait_for(Duration::from_secs(3), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        PingLog::parse(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl PingLog {
    /// Parses `[1700000000.123456] 64 bytes from A: icmp_seq=N ttl=64 time=0.1 ms` lines.
    pub fn parse(text: &str) -> PingLog {
        let mut replies: Vec<(u32, f64)> = text
            .lines()
            .filter(|l| l.contains(" bytes from "))
            .filter_map(|l| {
                let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
                let seq = l
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("icmp_seq="))?
                    .parse()
                    .ok()?;
                Some((seq, ts))
            })
            .collect();
        replies.sort_by_key(|r| r.0);
        replies.dedup_by_key(|r| r.0);
        PingLog { replies }
    }

    /// Replies received at or after epoch time `t`.
    pub fn replies_after(&self, t: f64) -> usize {
        self.replies.iter().filter(|r| r.1 >= t).count()
    }

    /// Receive time of the first reply at or after epoch time `t`.
    pub fn first_after(&self, t: f64) -> Option<f64> {
        self.replies
            .iter()
            .map(|r| r.1)
            .filter(|&ts| ts >= t)
            .fold(None, |m: Option<f64>, ts| Some(m.map_or(ts, |m| m.min(ts))))
    }

    /// Requests lost after epoch time `t`: sequence numbers after the last reply received before
    /// `t`, up to the last reply received, that got no reply (requests still in flight at the end
    /// are not counted). Also returns how many requests that span covers.
    pub fn lost_after(&self, t: f64) -> (usize, usize) {
        let got: BTreeSet<u32> = self.replies.iter().map(|r| r.0).collect();
        let from = self
            .replies
            .iter()
            .filter(|r| r.1 < t)
            .map(|r| r.0)
            .max()
            .unwrap_or(0);
        let to = got.iter().next_back().copied().unwrap_or(0);
        if to <= from {
            return (0, 0);
        }
        let span = (from + 1..=to).count();
        let lost = (from + 1..=to).filter(|s| !got.contains(s)).count();
        (lost, span)
    }
}
