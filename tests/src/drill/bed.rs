//! The drill testbed: [`AgentBed`] (namespaces `vpnlb-drl-*`, the real agent) plus [`WgBed`]
//! (gateways `wgd1..3`, clients `wgdc0..`) and a steady ping through every tunnel.
//!
//! The agent starts with `icmp` checks only (the gateways' WireGuard key does not exist yet), then
//! a reload adds the `wireguard` handshake probe once `wireguard-go` runs: the probe has its own key,
//! known to every gateway as a peer with a harmless /32. State changes go to an exec hook
//! ([`hook_script`]) that appends each event (wall-clock time, reason, every check's last result)
//! to a file and, unless disabled, fences the gateway that went down.
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
use vpnlb::control::Request;
use vpnlb_common::{FlowKey, PROTO_UDP};

use super::{Progress, poll};
use crate::agent::{AgentBed, INTERFACE, backend, backend_in, json_stream, vip};
use crate::testbed::{Topology, VIP, VIP_PORT};
use crate::wg::{Keypair, PingLog, Pinger, WgBed};

/// Namespace prefix of the drill (`vpnlb-drl-lb`, `vpnlb-drl-gw1`, ...).
pub const PREFIX: &str = "vpnlb-drl";
pub const GATEWAYS: usize = 3;
pub const CLIENTS: usize = 18;
/// Ping interval through every tunnel: 10 packets/s per client.
pub const PING_EVERY: Duration = Duration::from_millis(100);
/// `wireguard` probe timing: a wedged daemon is down after 2 x 250 ms.
pub const WG_INTERVAL_MS: u64 = 250;
pub const WG_TIMEOUT_MS: u64 = 200;
/// AllowedIPs of the probe peer on the gateways: a /32 nobody uses (TEST-NET-1).
const PROBE_ALLOWED: &str = "192.0.2.77/32";

/// The name of gateway `g` (0-based) in the agent's config.
pub fn gw_name(g: usize) -> String {
    format!("gw{}", g + 1)
}

/// The agent's config body: every gateway with `weights[g]`, an `icmp` check and, once the
/// gateways' key exists, the `wireguard` probe; the VIP over all of them; the event hook.
fn config(topo: &Topology, weights: &[u32], wg: Option<(&str, &PathBuf)>, hook: &Path) -> String {
    let mut s = String::from(INTERFACE);
    for (g, ns) in topo.gws.iter().enumerate() {
        s.push_str(&backend(g, Some(ns.mac("eth0")), weights[g], &["icmp"]));
        if let Some((server_pub, key_file)) = wg {
            s.push_str(&format!(
                "[[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{server_pub}\"\nprivate_key_file = \"{}\"\n\
                 interval_ms = {WG_INTERVAL_MS}\ntimeout_ms = {WG_TIMEOUT_MS}\nrise = 2\nfall = 2\n\n",
                key_file.display()
            ));
        }
    }
    let names: Vec<String> = (0..topo.gws.len()).map(gw_name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    s.push_str(&vip(&[("all", 0, &names)]));
    s.push_str(&format!(
        "[hooks]\nexec = [\"sh\", \"{}\"]\ntimeout_ms = 2000\n",
        hook.display()
    ));
    s
}

/// The exec hook: appends the event to `events`; with `fence`, when gateway `gwN` goes down, runs
/// `wg setconf wgdN <gw_conf>` (every peer replaced: its sessions and timers are gone, so it never
/// initiates a handshake to a client that moved) and appends a `fenced` event. In production the
/// same hook would reach the gateway (ssh, its own agent); here the UAPI socket is local.
fn hook_script(events: &Path, gw_conf: &Path, fence: bool) -> String {
    let mut s = format!(
        "#!/bin/sh\nev=$(cat)\nprintf '%s\\n' \"$ev\" >> {ev}\n",
        ev = events.display()
    );
    if fence {
        s.push_str("case \"$ev\" in *'\"to\":\"down\"'*)\n  case \"$ev\" in\n");
        for g in 0..GATEWAYS {
            s.push_str(&format!(
                "  *'\"backend\":\"{name}\"'*) wg setconf wgd{n} {conf} && \
                 printf '{{\"event\":\"fenced\",\"backend\":\"{name}\",\"at_wall\":%s}}\\n' \"$(date +%s.%N)\" >> {ev} ;;\n",
                name = gw_name(g),
                n = g + 1,
                conf = gw_conf.display(),
                ev = events.display()
            ));
        }
        s.push_str("  esac ;;\nesac\n");
    }
    s
}

/// Everything of one scenario, in drop order: pings, WireGuard daemons, then the agent, check
/// servers, namespaces and pins.
pub struct DrillBed {
    pub pingers: Vec<Pinger>,
    pub wg: WgBed,
    pub bed: AgentBed,
    /// The exec hook's output: one JSON event per state change or failover.
    pub events: PathBuf,
    hook: PathBuf,
    probe_key: PathBuf,
    /// Backend id of gateway g in the maps.
    pub ids: Vec<u32>,
    /// The gateway each client completed its handshake with before the fault.
    pub owner: Vec<usize>,
    /// Current weights (the reload scenario changes one).
    pub weights: Vec<u32>,
}

impl DrillBed {
    /// The testbed; `fence`: the hook fences a gateway that goes down (see the module docs).
    pub fn up(p: &Progress, fence: bool) -> Result<DrillBed> {
        let weights = vec![1; GATEWAYS];
        let (mut events, mut hook, mut gw_conf) = Default::default();
        let mut bed = AgentBed::up(PREFIX, GATEWAYS, CLIENTS, |t, s| {
            events = s.dir.join("events.json");
            hook = s.dir.join("hook.sh");
            gw_conf = s.dir.join("gw-fence.conf");
            std::fs::write(&hook, hook_script(&events, &gw_conf, fence)).expect("write hook");
            config(t, &weights, None, &hook)
        });
        // The topology's UDP echo sinks hold VIP:51820: wireguard-go takes the port.
        bed.topo.sinks.clear();
        let names: Vec<String> = (0..GATEWAYS).map(gw_name).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        bed.agent.wait_all_up(&names, Duration::from_secs(15));
        let mut wg = WgBed::up(&bed.topo, "wgd", "wgdc");

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
        std::fs::write(&gw_conf, &wg.gw_conf).context("gateway config for fencing")?;
        for d in &wg.gws {
            let out = Command::new("wg")
                .args([
                    "set",
                    &d.ifname,
                    "peer",
                    &probe.public,
                    "allowed-ips",
                    PROBE_ALLOWED,
                ])
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
        let mut d = DrillBed {
            pingers: Vec::new(),
            wg,
            bed,
            events,
            hook,
            probe_key,
            ids: Vec::new(),
            owner: Vec::new(),
            weights,
        };
        d.reload()?;
        let all_wg_up = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            let st = d.bed.agent.status();
            (0..GATEWAYS)
                .all(|g| check_of(&st, &gw_name(g), "wireguard").is_some_and(|c| c["up"] == true))
                .then_some(())
        })?;
        if all_wg_up.is_none() {
            bail!(
                "the wireguard probe did not come up on every gateway: {:#}",
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
        p.step(&format!(
            "testbed up: agent pid {}, {GATEWAYS} wireguard-go gateways (checks icmp + wireguard handshake every {WG_INTERVAL_MS} ms), {CLIENTS} client tunnels",
            d.bed.agent.pid()
        ));

        d.pingers = d.wg.ping_all(PING_EVERY);
        let all: Vec<usize> = (0..GATEWAYS).collect();
        let placed = poll(Duration::from_secs(15), Duration::from_millis(100), || {
            let p = d.wg.placement(&all);
            p.iter().all(|g| g.len() == 1).then_some(p)
        })?
        .with_context(|| {
            format!(
                "not every client completed one handshake: {:?}",
                d.wg.placement(&all)
            )
        })?;
        d.owner = placed.iter().map(|g| g[0].0).collect();
        Ok(d)
    }

    /// Writes the config for the current weights (with the wireguard probe) and reloads the agent
    /// through its control socket.
    pub fn reload(&mut self) -> Result<()> {
        let body = config(
            &self.bed.topo,
            &self.weights,
            Some((&self.wg.server.public, &self.probe_key)),
            &self.hook,
        );
        self.bed.agent.write_config(&body);
        let r = self.bed.agent.request(Request::Reload {});
        if !r.ok {
            bail!("reload refused: {r:?}");
        }
        Ok(())
    }

    /// The clients of each gateway at the start, as text ("gw1: 6, gw2: 7, gw3: 5").
    pub fn share(&self) -> String {
        (0..GATEWAYS)
            .map(|g| format!("{}: {}", gw_name(g), self.clients_of(g).len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Clients that were on gateway `g` before the fault.
    pub fn clients_of(&self, g: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&n| self.owner[n] == g)
            .collect()
    }

    /// The gateway with the most clients (the drills' victim: the most flows to move).
    pub fn busiest(&self) -> usize {
        (0..GATEWAYS)
            .max_by_key(|&g| (self.clients_of(g).len(), usize::MAX - g))
            .unwrap_or(0)
    }

    /// The session key of each client's tunnel at the LB (client underlay address:port -> VIP).
    pub fn flow_keys(&self) -> Vec<FlowKey> {
        self.wg
            .clients
            .iter()
            .map(|c| {
                FlowKey::new(
                    IpAddr::V4(c.addr),
                    IpAddr::V4(VIP),
                    c.port,
                    VIP_PORT,
                    PROTO_UDP,
                )
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

    /// Every client still uses the VIP as its endpoint (DSR kept: nobody roamed past the LB).
    pub fn endpoints_on_vip(&self) -> bool {
        (0..self.wg.clients.len()).all(|n| {
            self.wg.client_peer(n).and_then(|p| p.endpoint)
                == Some(SocketAddr::from((VIP, VIP_PORT)))
        })
    }
}

/// The check of `backend` whose label starts with `kind` in a `status` result.
pub fn check_of<'a>(status: &'a Value, backend: &str, kind: &str) -> Option<&'a Value> {
    backend_in(status, backend)?["checks"]
        .as_array()?
        .iter()
        .find(|c| c["check"].as_str().is_some_and(|l| l.starts_with(kind)))
}
