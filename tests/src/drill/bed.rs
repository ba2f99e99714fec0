//! The drill testbed: [`AgentBed`] (namespaces `vpnlb-drl-*`, the real agent) and three VPN
//! protocols served by every gateway at once: [`WgBed`] (`wireguard-go` on UDP 51820, interfaces
//! `wgd1..3`, clients `wgdc0..`), [`IpsecBed`] (charon on UDP 500 + 4500, clients behind NAT sites
//! `vpnlb-drl-i-*`) and [`OvpnBed`] (openvpn on UDP 1194, clients `vpnlb-drl-o-*`), with a steady
//! ping through every tunnel.
//!
//! One backend per gateway is in the pools of every VIP (WireGuard 51820; the IPsec group 500,
//! 4500 and ESP with `hash = "source"` and `session_ids = "ipsec"`; OpenVPN 1194), so a gateway the
//! agent takes down leaves all three. The agent starts with `icmp` checks only (the daemons and the
//! probes' keys do not exist yet), then a reload adds one probe per protocol once the daemons run:
//! the `wireguard` handshake probe (its own key, known to every gateway as a peer with a harmless
//! /32), the stateless `ikev2` SA_INIT probe, and a `udp` check on 1194 that replays a recorded
//! tls-crypt hard reset ([`Pki::hard_reset_probe`]), and the end-to-end probe: a `wireguard` check
//! with `inside` that pings a host behind every gateway ([`INSIDE_HOST`]) through the tunnel. State
//! changes go to an exec hook
//! ([`hook_script`]) that appends each event (wall-clock time, reason, every check's last result)
//! to a file and, unless disabled, fences the gateway that went down.
//!
//! Fencing also restarts the gateway's `openvpn` (SIGUSR1: every client instance dropped): alive and
//! able to send (black-holed inbound, or back after a flap), it otherwise keeps pinging its former
//! clients every second from the VIP, which resets their `ping-restart` timer, so they stay with it
//! until the server drops them itself (10 s: twice the pushed ping-restart) and reconnect ~15 s
//! after the fault instead of ~6 s.
//!
//! Two things every gateway of a shared-key WireGuard pool needs, found by these drills:
//! - its WireGuard packets must leave from the VIP even when `wireguard-go` has no remembered source
//!   ([`crate::wg::source_from_vip`], applied by `WgBed`);
//! - a gateway the LB took out must forget its tunnels (fencing): its `wireguard-go`, still alive,
//!   otherwise initiates handshakes to its former clients ~15 s after it last heard from them and
//!   every 5 s after that (for up to 90 s). Each initiation (same server key) replaces the handshake
//!   the client has in flight with the healthy gateway, so the client cannot get back.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vpnlb::agent::control::Request;
use vpnlb_common::{FlowKey, PROTO_UDP};

use super::{Progress, poll};
use crate::agent::{
    AgentBed, FALL, INTERFACE, INTERVAL_MS, RISE, TIMEOUT_MS, backend, backend_in, json_stream, vip,
};
use crate::ipsec::{CLIENT_CHARON, IpsecBed, IpsecOpts, ipsec_vips};
use crate::openvpn::{OvpnBed, Pki, hex};
use crate::testbed::{Topology, VIP, VIP_PORT};
use crate::wg::{Keypair, PingLog, Pinger, WgBed};

/// Namespace prefix of the drill (`vpnlb-drl-lb`, `vpnlb-drl-gw1`, ...).
pub const PREFIX: &str = "vpnlb-drl";
pub const GATEWAYS: usize = 3;
/// WireGuard clients (in one namespace, `wgdc*`).
pub const CLIENTS: usize = 18;
/// IPsec clients, each behind its own NAT site (`hash = "source"` places by public address).
pub const IPSEC_CLIENTS: usize = 6;
/// OpenVPN clients, each in its own namespace.
pub const OVPN_CLIENTS: usize = 6;
/// The OpenVPN VIP's port (WireGuard has 51820).
pub const OVPN_PORT: u16 = 1194;
/// Number of the first IPsec client: its tunnel address 10.99.1.101 and up stays clear of the
/// WireGuard clients' 10.99.1.1.. on the same gateways.
const IPSEC_FIRST: usize = 100;
/// Number of the first OpenVPN client: its address 10.77.0.60 and up stays clear of the WireGuard
/// clients' 10.77.0.20.. and the NAT sites' 10.77.0.40.. on the switch.
const OVPN_FIRST: usize = 40;
/// Ping interval through every tunnel: 10 packets/s per client.
pub const PING_EVERY: Duration = Duration::from_millis(100);
/// `wireguard` probe timing: a wedged daemon is down after 2 x 250 ms.
pub const WG_INTERVAL_MS: u64 = 250;
pub const WG_TIMEOUT_MS: u64 = 200;
/// AllowedIPs of the probe peer on the gateways: a /32 nobody uses (TEST-NET-1).
const PROBE_ALLOWED: &str = "192.0.2.77/32";
/// The host behind every gateway (namespace `vpnlb-drl-in`, reached through each gateway's `in0`
/// with forwarding and a masquerade) and the end-to-end probe that pings it through a WireGuard
/// tunnel (its own key, tunnel address [`INSIDE_TUNNEL`]).
pub const INSIDE_HOST: &str = "10.96.0.1";
const INSIDE_TUNNEL: &str = "192.0.2.78";
/// The label of that check.
pub const INSIDE_CHECK: &str = "wireguard:51820>10.96.0.1";
/// Its timing: handshake and echo within 200 ms each, every 500 ms.
const INSIDE_INTERVAL_MS: u64 = 500;

/// The VPN protocols every gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Wireguard,
    Ipsec,
    Openvpn,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Wireguard, Protocol::Ipsec, Protocol::Openvpn];

    /// The report's key (`tunnel_recovery_ms`, per-protocol losses).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Wireguard => "wireguard",
            Protocol::Ipsec => "ipsec",
            Protocol::Openvpn => "openvpn",
        }
    }

    /// The gateway's daemon.
    pub fn daemon(self) -> &'static str {
        match self {
            Protocol::Wireguard => "wireguard-go",
            Protocol::Ipsec => "charon",
            Protocol::Openvpn => "openvpn",
        }
    }

    /// The label (as in the agent's status and hook events) of the check that probes the daemon.
    pub fn check(self) -> &'static str {
        match self {
            Protocol::Wireguard => "wireguard:51820",
            Protocol::Ipsec => "ikev2:500",
            Protocol::Openvpn => "udp:1194",
        }
    }
}

/// The name of gateway `g` (0-based) in the agent's config.
pub fn gw_name(g: usize) -> String {
    format!("gw{}", g + 1)
}

/// What the protocol probes need: the gateways' WireGuard public key and the probe's private key
/// file, and the recorded OpenVPN hard reset.
struct Probes<'a> {
    wg_public: &'a str,
    wg_key: &'a Path,
    inside_key: &'a Path,
    ovpn_reset: &'a [u8],
}

/// The agent's config body: every gateway with `weights[g]`, an `icmp` check and, once the daemons
/// run, one probe per protocol; the WireGuard, IPsec and OpenVPN VIPs over all of them; the hook.
fn config(topo: &Topology, weights: &[u32], probes: Option<&Probes>, hook: &Path) -> String {
    let mut s = String::from(INTERFACE);
    for (g, ns) in topo.gws.iter().enumerate() {
        s.push_str(&backend(g, Some(ns.mac("eth0")), weights[g], &["icmp"]));
        if let Some(p) = probes {
            let timing = format!(
                "interval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n\n"
            );
            let hex = hex(p.ovpn_reset);
            s.push_str(&format!(
                "[[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{}\"\nprivate_key_file = \"{}\"\n\
                 interval_ms = {WG_INTERVAL_MS}\ntimeout_ms = {WG_TIMEOUT_MS}\nrise = 2\nfall = 2\n\n\
                 [[backend.check]]\ntype = \"ikev2\"\n{timing}\
                 [[backend.check]]\ntype = \"udp\"\nport = {OVPN_PORT}\npayload_hex = \"{hex}\"\n{timing}\
                 [[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{}\"\nprivate_key_file = \"{}\"\n\
                 inside = \"{INSIDE_HOST}\"\ntunnel_address = \"{INSIDE_TUNNEL}\"\ninside_timeout_ms = {WG_TIMEOUT_MS}\n\
                 interval_ms = {INSIDE_INTERVAL_MS}\ntimeout_ms = {WG_TIMEOUT_MS}\nrise = 2\nfall = 2\n\n",
                p.wg_public,
                p.wg_key.display(),
                p.wg_public,
                p.inside_key.display()
            ));
        }
    }
    let names: Vec<String> = (0..topo.gws.len()).map(gw_name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    s.push_str(&vip(&[("all", 0, &names)]));
    s.push_str(&ipsec_vips(&names, "session_ids = \"ipsec\"\n"));
    let list: Vec<String> = names.iter().map(|m| format!("\"{m}\"")).collect();
    s.push_str(&format!(
        "[[vip]]\nname = \"openvpn\"\naddress = \"{VIP}\"\nport = {OVPN_PORT}\nprotocol = \"udp\"\n\
         forwarding = \"l2dsr\"\n[[vip.pool]]\nname = \"all\"\nbackends = [{}]\n\n",
        list.join(", ")
    ));
    s.push_str(&format!(
        "[hooks]\nexec = [\"sh\", \"{}\"]\ntimeout_ms = 2000\n",
        hook.display()
    ));
    s
}

/// Where the PID of gateway `g`'s openvpn is kept for the fencing hook (removed once the drill
/// kills that openvpn, so the hook never signals a reused PID).
pub fn ovpn_pid_file(dir: &Path, g: usize) -> PathBuf {
    dir.join(format!("openvpn-{}.pid", gw_name(g)))
}

/// The exec hook: appends the event to `events`; with `fence`, when gateway `gwN` goes down, sends
/// SIGUSR1 to its openvpn (PID in [`ovpn_pid_file`] under `dir`: a restart drops every client
/// instance, so it stops pinging clients that moved), runs `wg setconf wgdN <gw_conf>` (every peer
/// replaced: its sessions and timers are gone, so it never initiates a handshake to a client that
/// moved) and appends a `fenced` event. In production the same hook would reach the gateway (ssh,
/// its own agent); here the UAPI socket and the PID are local.
fn hook_script(events: &Path, gw_conf: &Path, dir: &Path, fence: bool) -> String {
    let mut s = format!(
        "#!/bin/sh\nev=$(cat)\nprintf '%s\\n' \"$ev\" >> {ev}\n",
        ev = events.display()
    );
    if fence {
        s.push_str("case \"$ev\" in *'\"to\":\"down\"'*)\n  case \"$ev\" in\n");
        for g in 0..GATEWAYS {
            s.push_str(&format!(
                "  *'\"backend\":\"{name}\"'*) [ -f {pid} ] && kill -USR1 \"$(cat {pid})\"; \
                 wg setconf wgd{n} {conf} && \
                 printf '{{\"event\":\"fenced\",\"backend\":\"{name}\",\"at_wall\":%s}}\\n' \"$(date +%s.%N)\" >> {ev} ;;\n",
                name = gw_name(g),
                n = g + 1,
                pid = ovpn_pid_file(dir, g).display(),
                conf = gw_conf.display(),
                ev = events.display()
            ));
        }
        s.push_str("  esac ;;\nesac\n");
    }
    s
}

/// Everything of one scenario, in drop order: pings, OpenVPN, IPsec and WireGuard daemons (and
/// their client namespaces), then the agent, check servers, namespaces and pins.
pub struct DrillBed {
    /// One per client of [`DrillBed::clients`], in that order.
    pub pingers: Vec<Pinger>,
    pub ovpn: OvpnBed,
    pub ipsec: IpsecBed,
    pub wg: WgBed,
    pub bed: AgentBed,
    /// The exec hook's output: one JSON event per state change or failover.
    pub events: PathBuf,
    hook: PathBuf,
    probe_key: PathBuf,
    inside_key: PathBuf,
    ovpn_reset: Vec<u8>,
    /// The host behind the gateways (see [`INSIDE_HOST`]).
    pub inside: crate::netns::Netns,
    /// Backend id of gateway g in the maps.
    pub ids: Vec<u32>,
    /// Every client tunnel (protocol, index in its bed): WireGuard, then IPsec, then OpenVPN.
    pub clients: Vec<(Protocol, usize)>,
    /// The gateway each client's tunnel was established with before the fault.
    pub owner: Vec<usize>,
    /// Current weights (the reload scenario changes one).
    pub weights: Vec<u32>,
}

impl DrillBed {
    /// The testbed; `fence`: the hook fences a gateway that goes down (see the module docs).
    pub fn up(p: &Progress, fence: bool) -> Result<DrillBed> {
        let weights = vec![1; GATEWAYS];
        let ovpn_prefix = format!("{PREFIX}-o");
        let pki = Pki::generate(&ovpn_prefix);
        let ovpn_reset = pki.hard_reset_probe(&ovpn_prefix);
        let (mut events, mut hook, mut gw_conf) = Default::default();
        let mut bed = AgentBed::up(PREFIX, GATEWAYS, CLIENTS, |t, s| {
            events = s.dir.join("events.json");
            hook = s.dir.join("hook.sh");
            gw_conf = s.dir.join("gw-fence.conf");
            std::fs::write(&hook, hook_script(&events, &gw_conf, &s.dir, fence))
                .expect("write hook");
            config(t, &weights, None, &hook)
        });
        // The topology's UDP echo sinks hold VIP:51820: wireguard-go takes the port.
        bed.topo.sinks.clear();
        let names: Vec<String> = (0..GATEWAYS).map(gw_name).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        bed.agent.wait_all_up(&names, Duration::from_secs(15));
        let mut wg = WgBed::up(&bed.topo, "wgd", "wgdc");
        let mut ipsec = IpsecBed::up(
            &bed.topo,
            &format!("{PREFIX}-i"),
            &IpsecOpts {
                sites: &[],
                gw_charon: "",
                gw_conn: "",
                client_charon: CLIENT_CHARON,
                client_conn: "",
            },
        );
        ipsec.first_client = IPSEC_FIRST;
        for k in 0..IPSEC_CLIENTS {
            ipsec.add_site(&bed.topo, k, 1);
        }
        let mut ovpn = OvpnBed::up_on(&bed.topo, &ovpn_prefix, pki, OVPN_PORT);
        ovpn.first_client = OVPN_FIRST;
        for (g, gw) in ovpn.gws.iter().enumerate() {
            let pid = gw.daemon.pid().context("openvpn gateway PID")?;
            std::fs::write(ovpn_pid_file(&bed.scratch.dir, g), pid.to_string())
                .context("openvpn PID file")?;
        }

        // The probe's key: a peer of every gateway, and a file only root reads.
        let probe = Keypair::generate();
        let probe_key = bed.scratch.dir.join("wg-probe.key");
        std::fs::write(&probe_key, format!("{}\n", probe.private)).context("probe key")?;
        std::fs::set_permissions(&probe_key, std::fs::Permissions::from_mode(0o600))?;
        // `wg set` adds the peer without re-applying the listen port (which would make
        // wireguard-go forget that it answers from the VIP); gw_conf keeps it for restarts.
        wg.gw_conf.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {PROBE_ALLOWED}\n",
            probe.public
        ));
        // The end-to-end probe's key: another peer, its tunnel address routed into the tunnel.
        let inside_probe = Keypair::generate();
        let inside_key = bed.scratch.dir.join("wg-inside-probe.key");
        std::fs::write(&inside_key, format!("{}\n", inside_probe.private)).context("probe key")?;
        std::fs::set_permissions(&inside_key, std::fs::Permissions::from_mode(0o600))?;
        wg.gw_conf.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {INSIDE_TUNNEL}/32\n",
            inside_probe.public
        ));
        std::fs::write(&gw_conf, &wg.gw_conf).context("gateway config for fencing")?;
        for d in &wg.gws {
            for (key, allowed) in [
                (&probe.public, PROBE_ALLOWED.to_string()),
                (&inside_probe.public, format!("{INSIDE_TUNNEL}/32")),
            ] {
                let out = Command::new("wg")
                    .args(["set", &d.ifname, "peer", key, "allowed-ips", &allowed])
                    .output()
                    .context("wg set")?;
                if !out.status.success() {
                    bail!(
                        "wg set {} peer: {}",
                        d.ifname,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let inside = inside_network(&bed.topo, &wg)?;
        let clients = Protocol::ALL
            .iter()
            .flat_map(|&pr| {
                let n = match pr {
                    Protocol::Wireguard => CLIENTS,
                    Protocol::Ipsec => IPSEC_CLIENTS,
                    Protocol::Openvpn => OVPN_CLIENTS,
                };
                (0..n).map(move |i| (pr, i))
            })
            .collect();
        let mut d = DrillBed {
            pingers: Vec::new(),
            ovpn,
            ipsec,
            wg,
            bed,
            events,
            hook,
            probe_key,
            inside_key,
            ovpn_reset,
            inside,
            ids: Vec::new(),
            clients,
            owner: Vec::new(),
            weights,
        };
        d.reload()?;
        let all_probes_up = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            let st = d.bed.agent.status();
            (0..GATEWAYS)
                .all(|g| {
                    Protocol::ALL
                        .iter()
                        .map(|pr| pr.check())
                        .chain([INSIDE_CHECK])
                        .all(|label| {
                            check_of(&st, &gw_name(g), label)
                                .is_some_and(|c| c["up"] == true && c["last_ok"] == true)
                        })
                })
                .then_some(())
        })?;
        if all_probes_up.is_none() {
            bail!(
                "the protocol probes did not come up on every gateway: {:#}",
                d.bed.agent.status()
            );
        }
        let st = d.bed.agent.status();
        d.ids = (0..GATEWAYS)
            .map(|g| {
                backend_in(&st, &gw_name(g))
                    .and_then(|b| b["id"].as_u64())
                    .map(|id| id as u32)
                    .context("backend id in status")
            })
            .collect::<Result<_>>()?;
        // Connected once every probe is up, so the first packets meet the full ring.
        d.ipsec.connect_all();
        d.ovpn.connect(&d.bed.topo, OVPN_CLIENTS);
        p.step(&format!(
            "testbed up: agent pid {}, {GATEWAYS} gateways each running wireguard-go, charon and openvpn \
             (checks icmp + wireguard handshake every {WG_INTERVAL_MS} ms + ikev2 + openvpn hard reset every {INTERVAL_MS} ms); \
             {CLIENTS} WireGuard, {IPSEC_CLIENTS} IPsec, {OVPN_CLIENTS} OpenVPN client tunnels",
            d.bed.agent.pid()
        ));

        d.pingers = d.wg.ping_all(PING_EVERY);
        d.pingers.extend(d.ipsec.ping_all(PING_EVERY));
        d.pingers.extend(d.ovpn.ping_all(PING_EVERY));
        let owner = poll(Duration::from_secs(15), Duration::from_millis(100), || {
            d.placement()
                .into_iter()
                .map(|g| (g.len() == 1).then(|| g[0]))
                .collect::<Option<Vec<usize>>>()
        })?
        .with_context(|| {
            format!(
                "not every client tunnel is established with exactly one gateway: {:?}",
                d.placement()
            )
        })?;
        d.owner = owner;
        Ok(d)
    }

    /// For each client of [`DrillBed::clients`]: the gateways its tunnel is established with
    /// (WireGuard: a completed handshake; IPsec: an IKE_SA with a CHILD_SA; OpenVPN: in the status).
    pub fn placement(&self) -> Vec<Vec<usize>> {
        let all: Vec<usize> = (0..GATEWAYS).collect();
        let mut out = gateways(self.wg.placement(&all));
        out.extend(gateways(self.ipsec.placement()));
        out.extend(gateways(self.ovpn.placement(&all)));
        out
    }

    /// How many of `of` are of each protocol, as text ("6 wireguard, 2 ipsec, 3 openvpn").
    pub fn share_of(&self, of: &[usize]) -> String {
        Protocol::ALL
            .iter()
            .map(|&pr| format!("{} {}", self.of_protocol(pr, of).len(), pr.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Indices (into [`DrillBed::clients`]) of protocol `pr`'s clients among `of`.
    pub fn of_protocol(&self, pr: Protocol, of: &[usize]) -> Vec<usize> {
        of.iter()
            .copied()
            .filter(|&n| self.clients[n].0 == pr)
            .collect()
    }

    /// Writes the config for the current weights (with the wireguard probe) and reloads the agent
    /// through its control socket.
    pub fn reload(&mut self) -> Result<()> {
        let probes = Probes {
            wg_public: &self.wg.server.public,
            wg_key: &self.probe_key,
            inside_key: &self.inside_key,
            ovpn_reset: &self.ovpn_reset,
        };
        let body = config(&self.bed.topo, &self.weights, Some(&probes), &self.hook);
        self.bed.agent.write_config(&body);
        let r = self.bed.agent.request(Request::Reload {});
        if !r.ok {
            bail!("reload refused: {r:?}");
        }
        Ok(())
    }

    /// The clients of each gateway at the start, per protocol, as text
    /// ("gw1: 6/2/1, gw2: ..." for WireGuard/IPsec/OpenVPN).
    pub fn share(&self) -> String {
        (0..GATEWAYS)
            .map(|g| {
                let of = self.clients_of(g);
                let per: Vec<String> = Protocol::ALL
                    .iter()
                    .map(|&pr| self.of_protocol(pr, &of).len().to_string())
                    .collect();
                format!("{}: {}", gw_name(g), per.join("/"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Clients that were on gateway `g` before the fault.
    pub fn clients_of(&self, g: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&n| self.owner[n] == g)
            .collect()
    }

    /// The drills' victim: the gateway whose fewest clients of one protocol are the most (every
    /// protocol has clients to move), then the one with the most clients in all.
    pub fn busiest(&self) -> usize {
        (0..GATEWAYS)
            .max_by_key(|&g| {
                let of = self.clients_of(g);
                let fewest = Protocol::ALL
                    .iter()
                    .map(|&pr| self.of_protocol(pr, &of).len())
                    .min()
                    .unwrap_or(0);
                (fewest, of.len(), usize::MAX - g)
            })
            .unwrap_or(0)
    }

    /// The session key of each client's tunnel at the LB (client address:port -> VIP:port), in
    /// the order of [`DrillBed::clients`]. An IPsec client is seen from its NAT site's public
    /// address, NAT-T port 4500 (the masquerade keeps the port: one client per site).
    pub fn flow_keys(&self) -> Vec<FlowKey> {
        let key =
            |a, sport, dport| FlowKey::new(IpAddr::V4(a), IpAddr::V4(VIP), sport, dport, PROTO_UDP);
        self.clients
            .iter()
            .map(|&(pr, i)| match pr {
                Protocol::Wireguard => {
                    let c = &self.wg.clients[i];
                    key(c.addr, c.port, VIP_PORT)
                }
                Protocol::Ipsec => key(
                    self.ipsec.nats[self.ipsec.clients[i].site].public,
                    4500,
                    4500,
                ),
                Protocol::Openvpn => {
                    let c = &self.ovpn.clients[i];
                    key(c.addr, c.port, OVPN_PORT)
                }
            })
            .collect()
    }

    /// Hook events so far (`backend_state`, `failover`, and the hook's own `fenced`).
    pub fn events(&self) -> Vec<Value> {
        json_stream(&self.events)
    }

    /// For each client in `moved`: once it completed a handshake at or after `since` (epoch
    /// seconds) with a gateway of `healthy`, that gateway. Polls until all have or `timeout`.
    pub fn wait_rehandshake(
        &self,
        moved: &[usize],
        healthy: &[usize],
        since: f64,
        timeout: Duration,
        p: &Progress,
    ) -> Result<Vec<Option<usize>>> {
        let mut back: Vec<Option<usize>> = vec![None; moved.len()];
        let mut last_note = std::time::Instant::now();
        poll(timeout, Duration::from_millis(100), || {
            let placed = self.wg.placement(healthy);
            for (i, &n) in moved.iter().enumerate() {
                if back[i].is_none() {
                    back[i] = placed[n]
                        .iter()
                        .find(|(_, peer)| peer.latest_handshake as f64 >= since.floor())
                        .map(|(g, _)| *g);
                }
            }
            let done = back.iter().filter(|b| b.is_some()).count();
            if last_note.elapsed() > Duration::from_secs(4) && done < moved.len() {
                last_note = std::time::Instant::now();
                p.step(&format!(
                    "  waiting for WireGuard re-handshakes (~15 s without replies): {done} of {} clients back",
                    moved.len()
                ));
            }
            (done == moved.len()).then_some(())
        })?;
        Ok(back)
    }

    /// Stops every pinger and returns what each saw.
    pub fn stop_pings(&mut self) -> Vec<PingLog> {
        self.pingers.iter_mut().map(Pinger::stop).collect()
    }

    /// Every WireGuard client still uses the VIP as its endpoint and every OpenVPN client
    /// exchanged UDP with the VIP only (DSR kept: nobody roamed past the LB).
    pub fn endpoints_on_vip(&self) -> bool {
        (0..self.wg.clients.len()).all(|n| {
            self.wg.client_peer(n).and_then(|p| p.endpoint)
                == Some(SocketAddr::from((VIP, VIP_PORT)))
        }) && self.ovpn.clients.iter().all(|c| {
            let k = c.udp_counters();
            k.to_other == 0 && k.from_other == 0
        })
    }
}

/// The network behind the gateways: namespace `vpnlb-drl-in` holding [`INSIDE_HOST`], a link to
/// each gateway (`in0` there, 10.96.g.1/24), forwarding and a masquerade on every gateway, and the
/// end-to-end probe's tunnel address routed into each gateway's WireGuard interface.
fn inside_network(topo: &Topology, wg: &WgBed) -> Result<crate::netns::Netns> {
    let inside = crate::netns::Netns::new(&format!("{PREFIX}-in"));
    inside.sh(&format!("ip addr add {INSIDE_HOST}/32 dev lo"));
    for (g, gw) in topo.gws.iter().enumerate() {
        let n = g + 1;
        crate::netns::ip(&[
            "-n",
            gw.name(),
            "link",
            "add",
            "in0",
            "type",
            "veth",
            "peer",
            "name",
            &format!("ig{n}"),
            "netns",
            inside.name(),
        ]);
        inside.sh(&format!(
            "ip addr add 10.96.{n}.2/24 dev ig{n} && ip link set ig{n} up"
        ));
        gw.sh(&format!(
            "ip addr add 10.96.{n}.1/24 dev in0 && ip link set in0 up \
             && ip route add {INSIDE_HOST}/32 via 10.96.{n}.2 && sysctl -qw net.ipv4.ip_forward=1 \
             && ip route replace {INSIDE_TUNNEL}/32 dev {}",
            wg.gws[g].ifname
        ));
        gw.sh(
            "nft -f - <<'EOF'\ntable ip vpnlb_inside {\n  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"in0\" masquerade\n  }\n}\nEOF",
        );
    }
    Ok(inside)
}

/// The gateways of each client in a bed's placement.
fn gateways<T>(placement: Vec<Vec<(usize, T)>>) -> Vec<Vec<usize>> {
    placement
        .into_iter()
        .map(|g| g.into_iter().map(|(g, _)| g).collect())
        .collect()
}

/// The check of `backend` whose label starts with `kind` in a `status` result.
pub fn check_of<'a>(status: &'a Value, backend: &str, kind: &str) -> Option<&'a Value> {
    backend_in(status, backend)?["checks"]
        .as_array()?
        .iter()
        .find(|c| c["check"].as_str().is_some_and(|l| l.starts_with(kind)))
}
