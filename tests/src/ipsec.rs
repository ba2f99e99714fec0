//! strongSwan IKEv2 (charon with kernel-libipsec, PSK) gateways and clients in network namespaces:
//! - [`Charon`]: one charon per namespace with its own /run (bind mount in a private mount
//!   namespace, its pid file path is fixed), its own strongswan.conf, log and vici socket in a
//!   directory; killed by PID on drop. [`Charon::list_sas`] parses `swanctl --list-sas`.
//! - [`IpsecBed`]: over a [`Topology`] whose gateways hold the VIP on `lo`: one charon per gateway
//!   (`local_addrs = VIP` and `mobike = no`, so it answers from the VIP and never moves the SA to
//!   its own address: DSR), and NAT sites: a namespace per site on the switch with its own public
//!   address (nftables masquerade) and one or more client namespaces behind it, each running its
//!   own charon that connects to the VIP (real NAT-T: IKE floats to 4500, ESP-in-UDP on 4500).
//!
//! Tunnel addressing as in [`crate::wg`]: client `n` holds 10.99.1.(n+1)/32 on `lo` (its traffic
//! selector) and pings 10.98.(n+1).1, which every gateway answers (a local route for 10.98.0.0/16 and `local_ts =
//! 10.98.0.0/16`), so a client that moves to another gateway keeps its target.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{FALL, INTERVAL_MS, RISE, TIMEOUT_MS, wait_for};
use crate::netns::{Netns, cable, fmt_mac};
use crate::testbed::{Topology, VIP};
use crate::wg::{Pinger, client_target, client_tunnel_addr, die_with_parent};

/// The pre-shared key of every connection.
pub const PSK: &str = "vpnlb-ipsec-test-secret";
/// IKE identity of every gateway (they are interchangeable behind the VIP).
pub const GW_ID: &str = "gw.vpnlb.test";
/// Plugins charon needs here (kdf and openssl are required; kernel-libipsec: no kernel ESP).
pub const PLUGINS: &str = "random nonce openssl kdf sha1 sha2 aes gcm pem pkcs1 x509 pubkey \
     revocation constraints curve25519 hmac kernel-libipsec kernel-netlink socket-default vici updown";

/// strongswan.conf for a charon of our own: plugins, vici socket and log in `dir`, and `extra`
/// lines inside the `charon` section (one setting per line).
pub fn strongswan_conf(dir: &Path, extra: &str) -> String {
    let d = dir.display();
    format!(
        "charon {{
  load = {PLUGINS}
{extra}
  filelog {{
    vplog {{
      path = {d}/charon.log
      time_format = %s
      flush_line = yes
      default = 1
      ike = 2
      cfg = 2
      knl = 2
      chd = 2
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{d}/charon.vici
    }}
  }}
}}
"
    )
}

/// One charon in a namespace, with its files in `dir`; killed by PID (SIGCONT first, so a stopped
/// one dies too) on drop.
pub struct Charon {
    pub ns: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Charon {
    /// Writes `dir/strongswan.conf` (with `extra` charon settings), starts charon in namespace
    /// `ns` with `dir/run` as its /run, and waits for its vici socket.
    pub fn start(ns: &str, dir: &Path, extra: &str) -> Charon {
        let run_dir = dir.join("run");
        std::fs::create_dir_all(&run_dir).expect("charon run dir");
        let _ = std::fs::remove_file(dir.join("charon.vici"));
        std::fs::write(dir.join("strongswan.conf"), strongswan_conf(dir, extra))
            .expect("strongswan.conf");
        let out = std::fs::File::create(dir.join("charon.out")).expect("charon output");
        let script = format!(
            "mount --bind {} /run && STRONGSWAN_CONF={}/strongswan.conf exec /usr/lib/ipsec/charon",
            run_dir.display(),
            dir.display()
        );
        // nsenter, unshare (without --fork) and `sh -c 'exec ..'` all exec: the PID is charon's.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("spawn charon (apt-get install strongswan-charon)");
        let mut c = Charon {
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let vici = dir.join("charon.vici");
        let up = wait_for(Duration::from_secs(10), || {
            if !c.alive() {
                return Some(false);
            }
            vici.exists().then_some(true)
        });
        assert_eq!(
            up,
            Some(true),
            "charon in {ns} did not come up: {}",
            std::fs::read_to_string(dir.join("charon.out")).unwrap_or_default()
        );
        c
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

    /// Sends `sig` to charon (by PID).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("charon not running") as i32;
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill charon {sig}");
    }

    /// SIGKILL by PID and reap (a no-op once done).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// `swanctl ARGS --uri <our vici>`.
    pub fn swanctl(&self, args: &[&str]) -> Result<String, String> {
        let uri = format!("unix://{}/charon.vici", self.dir.display());
        let out = Command::new("swanctl")
            .args(args)
            .args(["--uri", &uri])
            .output()
            .map_err(|e| format!("swanctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "swanctl {} failed ({}): {text}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(text)
    }

    /// Writes `conf` to `dir/swanctl.conf` and loads it (`swanctl --load-all --file`); returns
    /// what swanctl printed.
    pub fn load(&self, conf: &str) -> String {
        let path = self.dir.join("swanctl.conf");
        std::fs::write(&path, conf).expect("swanctl.conf");
        self.swanctl(&["--load-all", "--file", path.to_str().expect("utf-8")])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The IKE_SAs charon holds (empty when it is gone).
    pub fn list_sas(&self) -> Vec<IkeSa> {
        self.swanctl(&["--list-sas"])
            .map(|t| IkeSa::parse(&t))
            .unwrap_or_default()
    }

    /// charon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One CHILD_SA of `swanctl --list-sas`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChildSa {
    pub state: String,
    pub in_spi: u32,
    pub out_spi: u32,
    pub in_packets: u64,
    pub out_packets: u64,
}

/// One IKE_SA of `swanctl --list-sas`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IkeSa {
    pub name: String,
    /// charon's unique id of the IKE_SA (`#N`): a new SA gets a new one.
    pub id: u32,
    pub state: String,
    pub local_id: String,
    pub local: Option<SocketAddr>,
    pub remote_id: String,
    pub remote: Option<SocketAddr>,
    pub children: Vec<ChildSa>,
}

/// `'ID' @ ADDR[PORT]` of a local/remote line.
fn endpoint(rest: &str) -> (String, Option<SocketAddr>) {
    let id = rest.split('\'').nth(1).unwrap_or("").to_string();
    let addr = rest.split(" @ ").nth(1).and_then(|a| {
        let (ip, port) = a.trim().trim_end_matches(']').split_once('[')?;
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    });
    (id, addr)
}

/// `in  c2a9c3e1,     84 bytes,     1 packets, ...`: (SPI, packets).
fn traffic(rest: &str) -> (u32, u64) {
    let mut f = rest.split(',');
    let spi = f
        .next()
        .and_then(|s| u32::from_str_radix(s.split_whitespace().next()?, 16).ok())
        .unwrap_or(0);
    let packets = f
        .find(|s| s.trim_end().ends_with("packets"))
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (spi, packets)
}

impl IkeSa {
    /// Parses the text of `swanctl --list-sas`: IKE_SA lines start at column 0 (`name: #1,
    /// ESTABLISHED, IKEv2, ...`), CHILD_SA lines at column 2 with a `#` (`net: #1, reqid 1,
    /// INSTALLED, ...`), their `in`/`out` counters at column 4.
    pub fn parse(text: &str) -> Vec<IkeSa> {
        let mut out: Vec<IkeSa> = Vec::new();
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let t = line.trim();
            if indent == 0 && t.contains(": #") {
                let (name, rest) = t.split_once(": #").unwrap_or_default();
                out.push(IkeSa {
                    name: name.to_string(),
                    id: rest
                        .split(',')
                        .next()
                        .and_then(|i| i.parse().ok())
                        .unwrap_or(0),
                    state: rest.split(", ").nth(1).unwrap_or("").to_string(),
                    ..IkeSa::default()
                });
                continue;
            }
            let Some(ike) = out.last_mut() else { continue };
            if indent == 2 && t.contains(": #") {
                ike.children.push(ChildSa {
                    state: t.split(", ").nth(2).unwrap_or("").to_string(),
                    ..ChildSa::default()
                });
            } else if let Some(r) = t.strip_prefix("local ").filter(|_| indent == 2) {
                (ike.local_id, ike.local) = endpoint(r);
            } else if let Some(r) = t.strip_prefix("remote ").filter(|_| indent == 2) {
                (ike.remote_id, ike.remote) = endpoint(r);
            } else if let Some(child) = ike.children.last_mut() {
                if let Some(r) = t.strip_prefix("in ") {
                    (child.in_spi, child.in_packets) = traffic(r);
                } else if let Some(r) = t.strip_prefix("out ") {
                    (child.out_spi, child.out_packets) = traffic(r);
                }
            }
        }
        out
    }

    /// Established, with an installed CHILD_SA.
    pub fn up(&self) -> bool {
        self.state == "ESTABLISHED" && self.children.iter().any(|c| c.state == "INSTALLED")
    }
}

/// Settings of the clients' charon: quick retransmissions so a dead gateway is declared dead by
/// DPD within seconds (0.5 s x 1.5^n, 3 retransmissions: about 4 s) instead of minutes.
pub const CLIENT_CHARON: &str = "  retransmit_timeout = 0.5
  retransmit_base = 1.5
  retransmit_tries = 3";

/// A gateway's connection: reached at the VIP, answers from it (`local_addrs`), never MOBIKE.
/// `extra` goes into the connection (e.g. `fragmentation = yes`).
pub fn gateway_conf(extra: &str) -> String {
    format!(
        "connections {{
  gw {{
    version = 2
    local_addrs = {VIP}
    mobike = no
    proposals = aes256-sha256-x25519
{extra}
    local {{
      auth = psk
      id = {GW_ID}
    }}
    remote {{
      auth = psk
    }}
    children {{
      net {{
        local_ts = 10.98.0.0/16
        remote_ts = 10.99.1.0/24
        esp_proposals = aes256gcm16
      }}
    }}
  }}
}}
secrets {{
  ike-any {{
    secret = \"{PSK}\"
  }}
}}
"
    )
}

/// Client `n`'s connection to the VIP: DPD every second and `dpd_action = restart`, so it comes
/// back (through the VIP, on whichever gateway the LB picks) when its gateway dies. `extra` goes
/// into the connection.
pub fn client_conf(n: usize, extra: &str) -> String {
    format!(
        "connections {{
  vpn {{
    version = 2
    remote_addrs = {VIP}
    proposals = aes256-sha256-x25519
    dpd_delay = 1s
{extra}
    local {{
      auth = psk
      id = client{n}.vpnlb.test
    }}
    remote {{
      auth = psk
      id = {GW_ID}
    }}
    children {{
      net {{
        local_ts = {inner}/32
        remote_ts = 10.98.0.0/16
        esp_proposals = aes256gcm16
        dpd_action = restart
      }}
    }}
  }}
}}
secrets {{
  ike-gw {{
    secret = \"{PSK}\"
  }}
}}
",
        inner = client_tunnel_addr(n)
    )
}

/// Public address of NAT site `k` (0-based) on the switch.
pub fn nat_public(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 40 + k as u8)
}

/// A NAT site: a namespace on the switch (`eth0`, public address, masquerade) with a bridge `lan`
/// (192.168.(k+1).1/24) its clients hang off. The bridge does not call netfilter (br_netfilter is
/// built in here): otherwise conntrack reassembles the clients' IP fragments at the bridge and the
/// NAT forwards them whole, where a router reassembles, translates and fragments them again.
pub struct NatSite {
    pub ns: Netns,
    pub public: Ipv4Addr,
    pub k: usize,
}

impl NatSite {
    /// NAT site `k` named `<prefix>-nat<k+1>`, cabled to the switch at port `nat<k+1>`.
    pub fn up(topo: &Topology, prefix: &str, k: usize) -> NatSite {
        let ns = Netns::new(&format!("{prefix}-nat{}", k + 1));
        let public = nat_public(k);
        cable(
            &topo.sw,
            &format!("nat{}", k + 1),
            &ns,
            &format!("{public}/24"),
        );
        ns.sh(&format!(
            "set -e
ip neigh replace {VIP} lladdr {} dev eth0 nud permanent
ip link add lan type bridge forward_delay 0 stp_state 0
ip addr add 192.168.{}.1/24 dev lan
ip link set lan up
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=0
nft -f - <<EOF
table ip nat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"eth0\" masquerade
  }}
}}
EOF",
            fmt_mac(&topo.lb_mac),
            k + 1
        ));
        NatSite { ns, public, k }
    }

    /// Address of the `j`-th client (0-based) behind this site.
    pub fn lan_addr(&self, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.k as u8 + 1, 10 + j as u8)
    }

    /// The NAT gets a new public address (an ISP renumbering it): the old one goes, which also
    /// drops the masquerade's conntrack entries, so every client flow leaves from `new` with
    /// fresh mappings. The new address comes first (promoted when the old one goes): removing
    /// the last address of `eth0` would flush its neighbours, the VIP's static entry included.
    pub fn renumber(&mut self, new: Ipv4Addr) {
        self.ns.sh(&format!(
            "sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1 && ip addr add {new}/24 dev eth0 \
             && ip addr del {old}/24 dev eth0",
            old = self.public
        ));
        self.public = new;
    }
}

/// One IPsec client: its namespace behind a NAT site and its charon.
pub struct IpsecClient {
    pub n: usize,
    /// Position of its NAT site in [`IpsecBed::nats`].
    pub site: usize,
    pub lan: Ipv4Addr,
    pub charon: Charon,
    pub ns: Netns,
}

impl IpsecClient {
    /// Its established IKE_SA with an installed CHILD_SA, if any.
    pub fn sa(&self) -> Option<IkeSa> {
        self.charon.list_sas().into_iter().find(IkeSa::up)
    }
}

/// Per-run files, removed on drop unless the thread panics (then kept for the logs).
pub struct RunDir(pub PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What an [`IpsecBed`] runs: NAT sites (clients behind each) and extra settings for the
/// gateways' and clients' strongswan.conf (`*_charon`) and connections (`*_conn`).
#[derive(Debug, Clone, Copy)]
pub struct IpsecOpts<'a> {
    pub sites: &'a [usize],
    pub gw_charon: &'a str,
    pub gw_conn: &'a str,
    pub client_charon: &'a str,
    pub client_conn: &'a str,
}

/// The IPsec layer over a [`Topology`]: a charon per gateway, NAT sites and clients. Drop it
/// before the topology (daemons and namespaces of its own go first, in field order).
pub struct IpsecBed {
    pub clients: Vec<IpsecClient>,
    pub gws: Vec<Charon>,
    pub nats: Vec<NatSite>,
    pub prefix: String,
    /// Extra strongswan.conf settings and connection lines of the clients.
    pub client_charon: String,
    pub client_conn: String,
    /// How long bringing the daemons and sites up took (without the connections).
    pub setup: Duration,
    pub dir: RunDir,
    /// Number of the first client (its tunnel address is `client_tunnel_addr(n)`): a testbed
    /// whose gateways also serve WireGuard clients 0.. starts past them.
    pub first_client: usize,
}

impl IpsecBed {
    /// Starts charon on every gateway of `topo` (connection from [`gateway_conf`]), brings up one
    /// NAT site per entry of `opts.sites` (its number of clients) and their clients, without
    /// connecting them yet.
    pub fn up(topo: &Topology, prefix: &str, opts: &IpsecOpts) -> IpsecBed {
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join(format!("vpnlb-ipsec-{}-{prefix}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let gw_conf = gateway_conf(opts.gw_conn);
        let gws = topo
            .gws
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                // A local address in local_ts: charon (kernel-libipsec) needs one to route the tunnel.
                ns.sh(
                    "ip addr add 10.98.0.1/32 dev lo && ip route replace local 10.98.0.0/16 dev lo",
                );
                let c = Charon::start(ns.name(), &dir.join(format!("gw{}", i + 1)), opts.gw_charon);
                c.load(&gw_conf);
                c
            })
            .collect();
        let mut bed = IpsecBed {
            clients: Vec::new(),
            gws,
            nats: Vec::new(),
            prefix: prefix.to_string(),
            client_charon: opts.client_charon.to_string(),
            client_conn: opts.client_conn.to_string(),
            setup: Duration::ZERO,
            dir: RunDir(dir),
            first_client: 0,
        };
        for (k, &count) in opts.sites.iter().enumerate() {
            bed.add_site(topo, k, count);
        }
        bed.setup = t0.elapsed();
        bed
    }

    /// Brings up NAT site `k` (public address [`nat_public`]`(k)`) with `count` clients behind it
    /// (namespaces `<prefix>-c<n+1>`, charon loaded with [`client_conf`]), not connected yet.
    /// Returns the new clients' numbers.
    pub fn add_site(&mut self, topo: &Topology, k: usize, count: usize) -> Vec<usize> {
        let site = NatSite::up(topo, &self.prefix, k);
        let mut added = Vec::new();
        for j in 0..count {
            let n = self.first_client + self.clients.len();
            let ns = Netns::new(&format!("{}-c{}", self.prefix, n + 1));
            let port = format!("c{}", n + 1);
            crate::netns::ip(&[
                "-n",
                site.ns.name(),
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            site.ns.sh(&format!(
                "ip link set {port} master lan up && ethtool -K {port} tx off >/dev/null"
            ));
            let lan = site.lan_addr(j);
            ns.sh(&format!(
                "set -e
ip addr add {lan}/24 dev eth0
ip link set eth0 up
ip route add default via 192.168.{}.1
ip addr add {}/32 dev lo
ethtool -K eth0 tx off >/dev/null",
                k + 1,
                client_tunnel_addr(n)
            ));
            let charon = Charon::start(
                ns.name(),
                &self.dir.0.join(format!("c{}", n + 1)),
                &self.client_charon,
            );
            charon.load(&client_conf(n, &self.client_conn));
            self.clients.push(IpsecClient {
                n,
                site: self.nats.len(),
                lan,
                charon,
                ns,
            });
            added.push(n);
        }
        self.nats.push(site);
        added
    }

    /// Public (NAT) address of client `n`.
    pub fn public(&self, n: usize) -> Ipv4Addr {
        self.nats[self.clients[n].site].public
    }

    /// Initiates client `n`'s CHILD_SA (IKE_SA_INIT on 500, then NAT-T on 4500) and waits for it.
    pub fn connect(&self, n: usize) -> Result<String, String> {
        self.clients[n]
            .charon
            .swanctl(&["--initiate", "--child", "net", "--timeout", "20"])
    }

    /// Connects every client, in parallel; panics naming the ones that failed.
    pub fn connect_all(&self) {
        let failed: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..self.clients.len())
                .map(|n| s.spawn(move || self.connect(n).err().map(|e| format!("client {n}: {e}"))))
                .collect();
            hs.into_iter()
                .filter_map(|h| h.join().expect("connect thread"))
                .collect()
        });
        assert!(
            failed.is_empty(),
            "clients failed to connect:\n{}",
            failed.join("\n")
        );
    }

    /// For each client: the gateways (indices) holding an established IKE_SA with it, and that SA.
    pub fn placement(&self) -> Vec<Vec<(usize, IkeSa)>> {
        let tables: Vec<Vec<IkeSa>> = self.gws.iter().map(Charon::list_sas).collect();
        self.clients
            .iter()
            .map(|c| {
                let id = format!("client{}.vpnlb.test", c.n);
                tables
                    .iter()
                    .enumerate()
                    .filter_map(|(g, t)| {
                        t.iter()
                            .find(|sa| sa.remote_id == id && sa.up())
                            .map(|sa| (g, sa.clone()))
                    })
                    .collect()
            })
            .collect()
    }

    /// A steady ping from every client through its tunnel, `interval` apart.
    pub fn ping_all(&self, interval: Duration) -> Vec<Pinger> {
        self.clients
            .iter()
            .map(|c| Pinger::start(c.ns.name(), client_target(c.n), interval, &self.dir.0, c.n))
            .collect()
    }
}

/// A `[[backend.check]]` of type `ikev2` (port 500) with the agent tests' timing (interval 200 ms,
/// timeout 150 ms, rise 2, fall 2).
pub fn ikev2_check() -> String {
    format!(
        "[[backend.check]]\ntype = \"ikev2\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n\n"
    )
}

/// `[[backend]]` entries for the gateways of `topo` (MACs written out) with the `checks` of
/// [`crate::agent::check`] and an [`ikev2_check`].
pub fn backends_ikev2_and(topo: &Topology, checks: &[&str]) -> String {
    topo.gws
        .iter()
        .enumerate()
        .map(|(i, gw)| crate::agent::backend(i, Some(gw.mac("eth0")), 1, checks) + &ikev2_check())
        .collect()
}

/// `[[backend]]` entries for the gateways of `topo` (MACs written out) with an `ikev2` check only.
pub fn backends_ikev2(topo: &Topology) -> String {
    backends_ikev2_and(topo, &[])
}

/// The IPsec VIP group on the testbed VIP, L2 DSR, `hash = "source"`, one pool over `members`:
/// `ike` (UDP 500), `natt` (UDP 4500) and `esp` (protocol 50); `extra` lines go into each VIP.
pub fn ipsec_vips(members: &[&str], extra: &str) -> String {
    ipsec_vips_forwarding(members, extra, "forwarding = \"l2dsr\"\n")
}

/// [`ipsec_vips`] with `forwarding` (the VIP's forwarding keys, e.g. from
/// [`crate::agent::Decap::vip_keys`]) instead of L2 DSR.
pub fn ipsec_vips_forwarding(members: &[&str], extra: &str, forwarding: &str) -> String {
    let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    let pool = format!(
        "[[vip.pool]]\nname = \"ipsec\"\nbackends = [{}]\n\n",
        list.join(", ")
    );
    [("ike", "port = 500\nprotocol = \"udp\""), ("natt", "port = 4500\nprotocol = \"udp\""), ("esp", "protocol = \"esp\"")]
        .iter()
        .map(|(name, l4)| {
            format!(
                "[[vip]]\nname = \"{name}\"\naddress = \"{VIP}\"\n{l4}\nhash = \"source\"\n{forwarding}{extra}{pool}"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_sas() {
        let text = "vpn: #1, ESTABLISHED, IKEv2, 5a3b0c6d7e8f9a0b_i* 1c2d3e4f5a6b7c8d_r
  local  'client0.vpnlb.test' @ 192.168.1.10[4500]
  remote 'gw.vpnlb.test' @ 10.77.0.100[4500]
  AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/CURVE_25519
  established 3s ago, rekeying in 14023s
  net: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256
    installed 3s ago, rekeying in 3300s, expires in 3957s
    in  c2a9c3e1,    840 bytes,    10 packets,     0s ago
    out c81f5ab8,    840 bytes,    10 packets,     0s ago
    local  10.99.1.1/32
    remote 10.98.0.0/16
";
        let sas = IkeSa::parse(text);
        assert_eq!(sas.len(), 1);
        let sa = &sas[0];
        assert_eq!(sa.name, "vpn");
        assert_eq!(sa.id, 1);
        assert_eq!(sa.state, "ESTABLISHED");
        assert_eq!(sa.local_id, "client0.vpnlb.test");
        assert_eq!(sa.remote_id, "gw.vpnlb.test");
        assert_eq!(sa.remote, Some("10.77.0.100:4500".parse().unwrap()));
        assert_eq!(sa.local, Some("192.168.1.10:4500".parse().unwrap()));
        assert_eq!(
            sa.children,
            vec![ChildSa {
                state: "INSTALLED".into(),
                in_spi: 0xc2a9c3e1,
                out_spi: 0xc81f5ab8,
                in_packets: 10,
                out_packets: 10,
            }]
        );
        assert!(sa.up());
        assert!(IkeSa::parse("").is_empty());
    }
}
