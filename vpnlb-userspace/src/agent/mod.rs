//! `vpnlb run`: the agent. It loads the XDP object over the pinned maps (adopting what a previous
//! agent left: sessions, rings, the attached program), runs the health checks, and after every event
//! (a check result, an admin command, a reload) reconciles the maps in the same event-loop turn.
//! Exiting leaves the program attached and the maps pinned: the data plane keeps forwarding.

pub mod control;
pub mod desired;
pub mod hooks;
pub mod metrics;
pub mod neigh;
pub mod reconcile;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::programs::Xdp;
use serde_json::json;
use tokio::sync::mpsc;
use vpnlb_common::{BACKEND_UNUSED, MAX_VIPS, prog_names};

use crate::agent::hooks::{HookConfig, HookEvent, Hooks};
use crate::agent::metrics::{Metrics, View};
use crate::agent::state::{Admin, BackendHealth, Health, Transition};
use crate::config::{self, Config, ConfigError, IdMap};
use crate::dataplane::Dataplane;
use crate::dataplane::attach::{self, AttachError};
use crate::dataplane::loader::{self, LoadOptions};
use crate::dataplane::maps::{AyaMaps, MapReader, MapWriter};
use crate::health::bfd::{BfdManager, BfdSessionHandle, SessionParams};
use crate::health::runner::{self, CheckHandle};
use crate::health::{CheckResult, CheckSpec, CheckTarget};
use control::{Command, Request, Response};
use reconcile::{Desired, PoolChoice};

use desired::Iface;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("programming the maps")]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Maps(#[from] crate::dataplane::maps::MapError),
    #[error("health check of backend {backend}: {reason}")]
    Check { backend: String, reason: String },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("{0}")]
    Internal(String),
}

/// Where the stable name -> id assignment is kept between agent runs (tmpfs, like bpffs: both are
/// gone after a reboot, together).
pub fn ids_path(control_socket: &Path) -> PathBuf {
    control_socket
        .parent()
        .unwrap_or(Path::new("/run/vpnlb"))
        .join("ids.json")
}

/// Where admin overrides (drain, disable) are kept between agent runs, next to the ids: a drained
/// or disabled gateway must stay so across an agent restart.
pub fn admin_path(control_socket: &Path) -> PathBuf {
    control_socket
        .parent()
        .unwrap_or(Path::new("/run/vpnlb"))
        .join("admin.json")
}

/// A running check of one backend. Held only for its Drop, which stops the check.
#[allow(dead_code)]
enum Running {
    Probe(CheckHandle),
    Bfd(BfdSessionHandle),
}

struct Agent {
    cfg: Config,
    config_path: PathBuf,
    ids: IdMap,
    /// Backend id -> name, for check results (rebuilt with `ids`).
    names: HashMap<u32, String>,
    /// Kept alive: owns the loaded program (the pinned links reference it).
    _ebpf: aya::Ebpf,
    dp: Dataplane<AyaMaps>,
    health: Health,
    ifaces: HashMap<String, Iface>,
    macs: HashMap<String, [u8; 6]>,
    checks: BTreeMap<String, Vec<Running>>,
    /// Backends whose next-hop MAC comes from the neighbour table: name -> (key, generation). One
    /// watcher task reads the table for all of them (`watch_neighbours`).
    neigh_wanted: NeighWanted,
    neigh_gen: u64,
    bfd: Option<BfdManager>,
    hooks: Hooks,
    metrics: Metrics,
    results_tx: mpsc::Sender<CheckResult>,
    choices: Vec<PoolChoice>,
    started: SystemTime,
    /// Check results arrived since the metrics view was last refreshed.
    view_dirty: bool,
}

type NeighWanted = Arc<Mutex<BTreeMap<String, (neigh::NeighKey, u64)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves the next-hop MACs of every backend in `wanted` from one read of the neighbour table
/// per second (nudging the kernel for missing ones), and reports each change of a backend's MAC,
/// and the first result of every new entry, on `tx`.
fn watch_neighbours(
    wanted: NeighWanted,
    tx: mpsc::Sender<NeighUpdate>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: HashMap<(String, u64), Option<[u8; 6]>> = HashMap::new();
        loop {
            let snapshot: Vec<(String, (neigh::NeighKey, u64))> = lock(&wanted)
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            if !snapshot.is_empty() {
                let table = tokio::task::spawn_blocking(neigh::table)
                    .await
                    .unwrap_or_default();
                last.retain(|k, _| snapshot.iter().any(|(n, (_, g))| *n == k.0 && *g == k.1));
                for (name, (key, generation)) in &snapshot {
                    let mac = table.get(key).copied();
                    let (dev, addr) = (&key.0, key.1);
                    if mac.is_none() {
                        neigh::nudge(addr);
                    }
                    let k = (name.clone(), *generation);
                    if last.get(&k) == Some(&mac) {
                        continue;
                    }
                    let detail = match mac {
                        Some(m) => format!("lladdr {} on {dev}", fmt_mac(&m)),
                        None => format!(
                            "no neighbour entry for {addr} on {dev}: set mac = ... or make it reachable"
                        ),
                    };
                    let u = NeighUpdate {
                        backend: name.clone(),
                        mac,
                        detail,
                    };
                    if tx.send(u).await.is_err() {
                        return;
                    }
                    last.insert(k, mac);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// A neighbour-resolution report for a backend without a configured MAC.
#[derive(Debug)]
struct NeighUpdate {
    backend: String,
    mac: Option<[u8; 6]>,
    detail: String,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Health entries for `cfg`'s backends: configured checks plus, for a backend whose MAC must be
/// resolved, a last pseudo-check "neigh" (down until the neighbour table has it).
fn health_entry(b: &crate::config::BackendConfig, id: u32, now: Instant) -> BackendHealth {
    // BFD reports session state changes, already debounced by its detect multiplier: 1/1.
    let mut checks: Vec<(String, u32, u32)> = b
        .checks
        .iter()
        .map(|c| match c {
            CheckSpec::Bfd { .. } => (c.label(), 1, 1),
            _ => (c.label(), c.timing().rise, c.timing().fall),
        })
        .collect();
    if b.mac.is_none() {
        checks.push(("neigh".into(), 1, 1));
    }
    BackendHealth::new(&b.name, id, checks, now)
}

impl Agent {
    fn desired(&self) -> Result<Desired, AgentError> {
        desired::desired(&self.cfg, &self.ids, &self.ifaces, &self.macs)
    }

    /// Reconciles the maps with the current desired state and health; emits failover hooks.
    fn apply(&mut self, why: &str, t0: Instant) -> Result<(), AgentError> {
        let desired = self.desired()?;
        let r = reconcile::reconcile(&mut self.dp, &desired, &self.health)?;
        let took = t0.elapsed();
        self.metrics.map_write.observe(took.as_secs_f64());
        if r.backends_written + r.vips_written + r.removed_vips + r.removed_backends > 0 {
            tracing::debug!(
                why,
                us = took.as_micros() as u64,
                ring_slots = r.report.ring_slots_written,
                entries = r.report.maps_written,
                "maps reconciled"
            );
        }
        for new in &r.choices {
            let old = self
                .choices
                .iter()
                .find(|o| o.vip == new.vip && o.class == new.class);
            if let Some(old) = old
                && old.pool != new.pool
            {
                tracing::warn!(vip = %new.vip, class = ?new.class, from = ?old.pool, to = ?new.pool, "pool failover");
                self.hooks.emit(HookEvent::failover(old, new));
            }
        }
        self.choices = r.choices;
        self.refresh_view();
        Ok(())
    }

    fn refresh_view(&mut self) {
        self.view_dirty = false;
        if let Ok(mut v) = self.metrics.view.lock() {
            *v = View {
                backends: self.health.backends.values().cloned().collect(),
                vips: self
                    .cfg
                    .vips
                    .iter()
                    .filter_map(|v| self.ids.vip(&v.name).map(|id| (v.name.clone(), id)))
                    .collect(),
                pools: self.choices.clone(),
            };
        }
    }

    fn log_transition(&self, t: &Transition) {
        let checks: Vec<String> = t
            .checks
            .iter()
            .map(|c| {
                format!(
                    "{}={}",
                    c.label,
                    match c.last_ok {
                        Some(true) => "ok",
                        Some(false) => "fail",
                        None => "-",
                    }
                )
            })
            .collect();
        tracing::warn!(
            backend = %t.backend,
            old = %t.from,
            new = %t.to,
            reason = %t.reason,
            checks = %checks.join(","),
            "backend state change"
        );
        self.hooks.emit(HookEvent::backend_state(t));
    }

    fn on_result(&mut self, r: CheckResult) -> Result<(), AgentError> {
        let t0 = Instant::now();
        let Some(name) = self.names.get(&r.backend_id).cloned() else {
            return Ok(());
        };
        let Some(b) = self.health.backends.get_mut(&name) else {
            return Ok(());
        };
        if let Some(t) = b.on_result(&r, t0) {
            self.log_transition(&t);
            self.apply("health", t0)?;
        } else {
            // Copying every backend's health into the metrics view per result would cost O(n)
            // per probe (O(n^2) per second with n backends): the loop refreshes it once a second.
            self.view_dirty = true;
        }
        Ok(())
    }

    fn on_neigh(&mut self, u: NeighUpdate) -> Result<(), AgentError> {
        let t0 = Instant::now();
        let changed = match u.mac {
            Some(m) => self.macs.insert(u.backend.clone(), m) != Some(m),
            None => self.macs.remove(&u.backend).is_some(),
        };
        let Some(b) = self.health.backends.get_mut(&u.backend) else {
            return Ok(());
        };
        let idx = b.checks.len().saturating_sub(1);
        let r = CheckResult {
            backend_id: b.id,
            check_index: idx,
            ok: u.mac.is_some(),
            latency: None,
            detail: u.detail,
            at: t0,
        };
        let t = b.on_result(&r, t0);
        if let Some(t) = &t {
            self.log_transition(t);
        }
        if changed || t.is_some() {
            self.apply("neighbour", t0)?;
        }
        Ok(())
    }

    /// Starts checks (and neighbour resolution) of backend `name`.
    fn start_checks(&mut self, name: &str) -> Result<(), AgentError> {
        let Some(b) = self.cfg.backends.iter().find(|b| b.name == name).cloned() else {
            return Ok(());
        };
        let id = self.ids.backend(&b.name).expect("assigned");
        let iface = desired::backend_iface(&self.cfg, &b).to_string();
        let mut running = Vec::new();
        for (i, spec) in b.checks.iter().enumerate() {
            let target = CheckTarget {
                backend_id: id,
                check_index: i,
                addr: b.address,
                source: None,
                interface: None,
            };
            let err = |reason: String| AgentError::Check {
                backend: b.name.clone(),
                reason,
            };
            if let CheckSpec::Bfd { .. } = spec {
                if self.bfd.is_none() {
                    self.bfd = Some(BfdManager::start().map_err(|e| err(format!("bfd: {e}")))?);
                }
                let params =
                    SessionParams::from_spec(spec).ok_or_else(|| err("bfd parameters".into()))?;
                let h = self.bfd.as_ref().expect("started").add_session(
                    params,
                    target,
                    self.results_tx.clone(),
                );
                running.push(Running::Bfd(h.map_err(|e| err(format!("bfd: {e}")))?));
            } else {
                let h = runner::spawn(spec, target, self.results_tx.clone())
                    .map_err(|e| err(e.to_string()))?;
                running.push(Running::Probe(h));
            }
        }
        self.checks.insert(b.name.clone(), running);
        if b.mac.is_none() {
            self.neigh_gen += 1;
            lock(&self.neigh_wanted).insert(b.name.clone(), ((iface, b.address), self.neigh_gen));
        }
        Ok(())
    }

    fn stop_checks(&mut self, name: &str) {
        self.checks.remove(name);
        lock(&self.neigh_wanted).remove(name);
        self.macs.remove(name);
    }

    fn status(&self) -> serde_json::Value {
        let backends: Vec<serde_json::Value> = self
            .cfg
            .backends
            .iter()
            .filter_map(|b| self.health.backends.get(&b.name).map(|h| (b, h)))
            .map(|(b, h)| {
                json!({
                    "name": b.name,
                    "id": h.id,
                    "address": b.address,
                    "weight": b.weight,
                    "state": h.state,
                    "admin": h.admin,
                    "since": unix(h.since_wall),
                    "since_s": h.since.elapsed().as_secs_f64(),
                    "transitions": h.transitions,
                    "checks": h.checks.iter().map(|c| json!({
                        "check": c.label,
                        "up": c.up,
                        "last_ok": c.last_ok,
                        "last_detail": c.last_detail,
                        "last_latency_ms": c.last_latency_ms,
                        "last_age_s": c.last_at.map(|t| t.elapsed().as_secs_f64()),
                        "results": c.results,
                        "failures": c.failures,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let vips: Vec<serde_json::Value> = self
            .cfg
            .vips
            .iter()
            .map(|v| {
                let pools: Vec<_> = self.choices.iter().filter(|c| c.vip == v.name).collect();
                json!({
                    "name": v.name,
                    "address": v.address,
                    "port": v.port.unwrap_or(0),
                    "protocol": v.protocol.as_str(),
                    "forwarding": v.forwarding.as_str(),
                    "active_pools": pools,
                    // Serving order (for `vpnlb status` / `simulate`: "pool failover").
                    "pools": v.pool_order(None).iter().map(|p| json!({
                        "name": p.name, "priority": p.priority, "backends": p.backends,
                    })).collect::<Vec<_>>(),
                    "classes": v.classes.iter().map(|c| json!({
                        "name": c.name, "dscp": c.dscp, "pool_order": c.pool_order,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "agent": {
                "pid": std::process::id(),
                "config": self.config_path,
                "started": unix(self.started),
                "pin_dir": self.cfg.agent.pin_dir,
                "interfaces": self.cfg.interfaces.iter().map(|i| &i.name).collect::<Vec<_>>(),
            },
            "backends": backends,
            "vips": vips,
        })
    }

    fn admin(&mut self, backend: &str, admin: Admin) -> Response {
        let t0 = Instant::now();
        let Some(b) = self.health.backends.get_mut(backend) else {
            return Response::err(format!("unknown backend {backend:?}"));
        };
        let t = b.set_admin(admin, t0);
        let state = b.state;
        if let Some(t) = &t {
            self.log_transition(t);
        }
        self.save_admin();
        if let Err(e) = self.apply("admin", t0) {
            return Response::err(format!("maps not updated: {}", chain(&e)));
        }
        Response::ok(json!({ "backend": backend, "state": state, "changed": t.is_some() }))
    }

    /// Saves the admin overrides of all backends (see [`admin_path`]).
    fn save_admin(&self) {
        let admin: BTreeMap<&str, Admin> = self
            .health
            .backends
            .iter()
            .filter(|(_, h)| h.admin != Admin::None)
            .map(|(n, h)| (n.as_str(), h.admin))
            .collect();
        save_json(
            &admin,
            &admin_path(&self.cfg.agent.control_socket),
            "admin overrides",
        );
    }

    /// Applies a new config as a delta. On any error the running config stays untouched.
    fn reload(&mut self) -> Result<serde_json::Value, AgentError> {
        let t0 = Instant::now();
        let new = config::load(&self.config_path)?;
        if new.agent.pin_dir != self.cfg.agent.pin_dir
            || new.agent.max_sessions != self.cfg.agent.max_sessions
        {
            return Err(AgentError::Internal(
                "pin_dir and max_sessions cannot change on reload (they define the pinned maps): restart the agent".into(),
            ));
        }
        let ids = config::assign_ids(&new, Some(&self.ids));
        let names: Vec<String> = new
            .interfaces
            .iter()
            .map(|i| i.name.clone())
            .chain(new.backends.iter().filter_map(|b| b.interface.clone()))
            .collect();
        let ifaces = neigh::ifaces(names.iter().map(String::as_str));
        // Dry run: the new desired state must resolve before anything changes.
        desired::desired(&new, &ids, &ifaces, &self.macs)?;
        let old = std::mem::replace(&mut self.cfg, new);
        let old_ids = std::mem::replace(&mut self.ids, ids);
        self.names = self
            .ids
            .backends
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect();
        self.ifaces = ifaces;
        // Backends: restart checks of new or changed ones, keep the health of unchanged ones.
        let now = Instant::now();
        let mut restarted = Vec::new();
        for b in self.cfg.backends.clone() {
            let before = old.backends.iter().find(|o| o.name == b.name);
            let same = before.is_some_and(|o| {
                o.checks == b.checks
                    && o.address == b.address
                    && o.mac == b.mac
                    && o.interface == b.interface
            }) && old_ids.backend(&b.name) == self.ids.backend(&b.name);
            if !same {
                // Same gateway (address, MAC, egress, id), other checks: it keeps serving, with
                // its resolved MAC, until the new checks conclude, like after a restart. Without
                // this it is Unknown (down in the data plane) until the first new probe, up to an
                // interval later, and its sessions are re-picked.
                let same_target = before.is_some_and(|o| {
                    o.address == b.address && o.mac == b.mac && o.interface == b.interface
                }) && old_ids.backend(&b.name) == self.ids.backend(&b.name);
                let mac = self.macs.get(&b.name).copied();
                self.stop_checks(&b.name);
                let old_health = self.health.backends.get(&b.name).cloned();
                let admin = old_health.as_ref().map(|h| h.admin).unwrap_or_default();
                let mut h = health_entry(&b, self.ids.backend(&b.name).expect("assigned"), now);
                h.admin = admin;
                if same_target && let Some(o) = &old_health {
                    h.carry_over(o);
                    if let Some(m) = mac {
                        self.macs.insert(b.name.clone(), m);
                    }
                }
                self.health.backends.insert(b.name.clone(), h);
                self.start_checks(&b.name)?;
                restarted.push(b.name.clone());
            }
        }
        let gone: Vec<String> = old
            .backends
            .iter()
            .map(|b| b.name.clone())
            .filter(|n| !self.cfg.backends.iter().any(|b| &b.name == n))
            .collect();
        for n in &gone {
            self.stop_checks(n);
            self.health.backends.remove(n);
        }
        // Interfaces: attach new ones, detach removed ones.
        for i in self.cfg.interfaces.clone() {
            if !old.interfaces.iter().any(|o| o.name == i.name) {
                tracing::info!(iface = %i.name, "reload: attaching");
                self.attach_one(&i.name, i.mode)?;
            }
        }
        for o in &old.interfaces {
            if !self.cfg.interfaces.iter().any(|i| i.name == o.name) {
                tracing::info!(iface = %o.name, "reload: detaching");
                attach::detach(&self.cfg.agent.pin_dir, &o.name)?;
            }
        }
        self.dp.set_config(desired::global_config(&self.cfg))?;
        self.apply("reload", t0)?;
        save_ids(&self.ids, &ids_path(&self.cfg.agent.control_socket));
        self.save_admin();
        tracing::info!(restarted = ?restarted, removed = ?gone, ms = t0.elapsed().as_millis() as u64, "config reloaded");
        Ok(json!({ "restarted_checks": restarted, "removed_backends": gone }))
    }

    fn attach_one(
        &mut self,
        ifname: &str,
        mode: crate::dataplane::attach::AttachMode,
    ) -> Result<(), AgentError> {
        let prog: &mut Xdp = self
            ._ebpf
            .program_mut(prog_names::INGRESS)
            .ok_or_else(|| AgentError::Internal("object has no vpnlb_ingress".into()))?
            .try_into()
            .map_err(|e| AgentError::Internal(format!("vpnlb_ingress: {e}")))?;
        let how = attach::attach(prog, ifname, mode, &self.cfg.agent.pin_dir)?;
        tracing::info!(iface = ifname, how = ?how, "vpnlb_ingress attached");
        Ok(())
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Drain { backend } => self.admin(&backend, Admin::Drain),
            Request::Disable { backend } => self.admin(&backend, Admin::Disable),
            Request::Undrain { backend } | Request::Enable { backend } => {
                self.admin(&backend, Admin::None)
            }
            Request::Reload {} => match self.reload() {
                Ok(v) => Response::ok(v),
                Err(e) => {
                    tracing::error!(error = %chain(&e), "reload rejected; the running config stays");
                    Response::err(chain(&e))
                }
            },
            Request::Status {} => Response::ok(self.status()),
        }
    }
}

/// An error with its sources, one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn load_ids(path: &Path) -> Option<IdMap> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn save_ids(ids: &IdMap, path: &Path) {
    save_json(ids, path, "id assignment");
}

fn load_admin(path: &Path) -> BTreeMap<String, Admin> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_json<T: serde::Serialize>(v: &T, path: &Path, what: &str) {
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "could not save {what}");
    }
}

/// Removes map entries a previous agent left that this config no longer has: VIPs first, then
/// their rings, then backends (make-before-break in reverse).
fn prune_adopted(
    dp: &mut Dataplane<AyaMaps>,
    desired: &Desired,
) -> Result<(usize, usize), AgentError> {
    let wanted_vips: Vec<_> = desired.vips.iter().map(|v| v.template.key).collect();
    let wanted_rings: Vec<u32> = desired
        .vips
        .iter()
        .flat_map(|v| {
            std::iter::once(v.template.ring_id).chain(v.classes.iter().map(|c| c.ring_id))
        })
        .collect();
    let wanted_backends: Vec<u32> = desired.backends.iter().map(|b| b.spec.id).collect();
    let w = dp.writer_mut();
    let mut vips = 0;
    for (k, meta) in w.vips()? {
        if !wanted_vips.contains(&k) {
            w.remove_vip(&k)?;
            vips += 1;
            if !wanted_rings.contains(&meta.ring_id) {
                let slots = w.ring(meta.ring_id, meta.ring_size)?;
                let zero: Vec<_> = slots
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| **id != 0)
                    .map(|(s, _)| vpnlb_common::maglev::SlotChange {
                        slot: s as u32,
                        backend_id: 0,
                    })
                    .collect();
                w.write_ring(meta.ring_id, &zero)?;
            }
        }
    }
    let mut backends = 0;
    for (id, b) in w.backends()? {
        if b.state != BACKEND_UNUSED && !wanted_backends.contains(&id) {
            w.clear_backend(id)?;
            backends += 1;
        }
    }
    Ok((vips, backends))
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), AgentError> {
    let cfg = config::load(&config_path)?;
    let started = SystemTime::now();
    attach::check_abi(&cfg.agent.pin_dir)?;
    // Claim the control socket before touching ids, maps or links: a second agent started on the
    // same config must stop here, not rewrite the maps, swap the program and then find the socket
    // taken (and, on exit, delete the running agent's socket).
    let ctl_listener = control::bind(&cfg.agent.control_socket)?;
    let ids_file = ids_path(&cfg.agent.control_socket);
    let admins = load_admin(&admin_path(&cfg.agent.control_socket));
    let ids = config::assign_ids(&cfg, load_ids(&ids_file).as_ref());
    save_ids(&ids, &ids_file);

    let obj = loader::object_bytes()?;
    let opts = LoadOptions {
        pin_dir: Some(cfg.agent.pin_dir.clone()),
        max_sessions: Some(cfg.agent.max_sessions),
        ring_rows: Some(MAX_VIPS),
    };
    let mut ebpf = loader::load(&obj, &opts)?;
    // Verify and load the program into the kernel before anything is written or attached: a
    // program that was never loaded cannot be attached (nor swapped into a pinned link).
    {
        let prog: &mut Xdp = ebpf
            .program_mut(prog_names::INGRESS)
            .ok_or_else(|| AgentError::Internal("object has no vpnlb_ingress".into()))?
            .try_into()
            .map_err(|e| AgentError::Internal(format!("vpnlb_ingress: {e}")))?;
        prog.load()
            .map_err(|e| AgentError::Internal(format!("loading vpnlb_ingress: {}", chain(&e))))?;
    }
    // Rare data-plane events (the flood guard engaging) arrive through aya-log's ring buffer and
    // go to our log through the `log` -> tracing bridge.
    match aya_log::EbpfLogger::init(&mut ebpf) {
        // SAFETY: the logger owns its ring-buffer fd and neither closes nor replaces it while the
        // AsyncFd owns the logger.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = fd.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "data-plane log reader unavailable"),
        },
        Err(e) => tracing::warn!(error = %e, "data-plane log reader unavailable"),
    }
    let maps = AyaMaps::from_ebpf(&mut ebpf)?;
    let adopted: HashMap<u32, u32> = maps
        .backends()?
        .into_iter()
        .map(|(id, b)| (id, b.state))
        .collect();
    let adopted_sessions = maps.sessions().map(|s| s.len()).unwrap_or(0);
    tracing::info!(pin_dir = %cfg.agent.pin_dir.display(), backends = adopted.len(), sessions = adopted_sessions, "maps loaded (pinned state adopted)");

    let hooks = Hooks::start(HookConfig {
        exec: cfg.hooks.exec.clone(),
        webhook: cfg.hooks.webhook.clone(),
        timeout: Duration::from_millis(cfg.hooks.timeout_ms),
    });
    let metrics = Metrics::new(
        AyaMaps::open_pinned(&cfg.agent.pin_dir)?,
        hooks.stats.clone(),
    );
    let (results_tx, mut results_rx) = mpsc::channel::<CheckResult>(4096);
    let (neigh_tx, mut neigh_rx) = mpsc::channel::<NeighUpdate>(256);
    let names: Vec<String> = cfg
        .interfaces
        .iter()
        .map(|i| i.name.clone())
        .chain(cfg.backends.iter().filter_map(|b| b.interface.clone()))
        .collect();
    let ifaces = neigh::ifaces(names.iter().map(String::as_str));
    let now = Instant::now();
    let mut health = Health::default();
    for b in &cfg.backends {
        let id = ids.backend(&b.name).expect("assigned");
        let mut h = health_entry(b, id, now);
        if let Some(a) = admins.get(&b.name) {
            h.restore_admin(*a);
        }
        // Restart: keep serving what was being served until the checks conclude.
        if b.mac.is_none() {
            // The neighbour pseudo-check decides quickly on its own.
        } else if let Some(st) = adopted.get(&id) {
            h.adopt(*st);
        }
        health.backends.insert(b.name.clone(), h);
    }
    let mut agent = Agent {
        config_path: config_path.clone(),
        names: ids
            .backends
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect(),
        ids,
        _ebpf: ebpf,
        dp: Dataplane::new(maps),
        health,
        ifaces,
        macs: HashMap::new(),
        checks: BTreeMap::new(),
        neigh_wanted: NeighWanted::default(),
        neigh_gen: 0,
        bfd: None,
        hooks,
        metrics: metrics.clone(),
        results_tx,
        choices: Vec::new(),
        started,
        view_dirty: false,
        cfg,
    };
    // Resolve MACs up front (one table read, one shared wait) so the first reconcile does not
    // write zero MACs for adopted backends.
    let unresolved: Vec<(String, neigh::NeighKey)> = agent
        .cfg
        .backends
        .iter()
        .filter(|b| b.mac.is_none())
        .map(|b| {
            (
                b.name.clone(),
                (desired::backend_iface(&agent.cfg, b).to_string(), b.address),
            )
        })
        .collect();
    if !unresolved.is_empty() {
        let keys: Vec<neigh::NeighKey> = unresolved.iter().map(|(_, k)| k.clone()).collect();
        let found = neigh::resolve_all(&keys, Duration::from_millis(300));
        for (name, key) in &unresolved {
            if let Some(m) = found.get(key) {
                agent.macs.insert(name.clone(), *m);
                if let Some(st) = adopted.get(&agent.ids.backend(name).expect("assigned")) {
                    agent
                        .health
                        .backends
                        .get_mut(name)
                        .expect("inserted")
                        .adopt(*st);
                }
            }
        }
    }
    agent.dp.set_config(desired::global_config(&agent.cfg))?;
    let t0 = Instant::now();
    agent.apply("start", t0)?;
    let want = agent.desired()?;
    let (pv, pb) = prune_adopted(&mut agent.dp, &want)?;
    if pv + pb > 0 {
        tracing::info!(
            vips = pv,
            backends = pb,
            "removed pinned entries the config no longer has"
        );
    }
    for i in agent.cfg.interfaces.clone() {
        agent.attach_one(&i.name, i.mode)?;
    }
    for b in agent
        .cfg
        .backends
        .iter()
        .map(|b| b.name.clone())
        .collect::<Vec<_>>()
    {
        agent.start_checks(&b)?;
    }

    let neigh_watch = watch_neighbours(agent.neigh_wanted.clone(), neigh_tx);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Command>(64);
    let ctl_path = agent.cfg.agent.control_socket.clone();
    let ctl = tokio::spawn(async move {
        if let Err(e) = control::serve_on(ctl_listener, ctl_path, ctl_tx).await {
            tracing::error!(error = %chain(&e), "control socket failed");
        }
    });
    let metrics_task = agent.cfg.agent.metrics_listen.map(|addr| {
        tokio::spawn(async move {
            if let Err(e) = metrics.serve(addr).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        })
    });
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    tracing::info!(pid = std::process::id(), "agent running");
    let mut view_tick = tokio::time::interval(Duration::from_secs(1));
    view_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = view_tick.tick() => {
                if agent.view_dirty {
                    agent.refresh_view();
                }
            }
            Some(r) = results_rx.recv() => {
                if let Err(e) = agent.on_result(r) {
                    tracing::error!(error = %chain(&e), "applying a health change failed; will retry on the next event");
                }
            }
            Some(u) = neigh_rx.recv() => {
                if let Err(e) = agent.on_neigh(u) {
                    tracing::error!(error = %chain(&e), "applying a neighbour change failed");
                }
            }
            Some(c) = ctl_rx.recv() => {
                let resp = agent.handle(c.request);
                let _ = c.reply.send(resp);
            }
            _ = hup.recv() => {
                if let Err(e) = agent.reload() {
                    tracing::error!(error = %chain(&e), "SIGHUP reload rejected; the running config stays");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        "exiting: vpnlb_ingress stays attached and the maps pinned; the data plane keeps forwarding"
    );
    ctl.abort();
    neigh_watch.abort();
    if let Some(m) = metrics_task {
        m.abort();
    }
    let _ = std::fs::remove_file(&agent.cfg.agent.control_socket);
    Ok(())
}
