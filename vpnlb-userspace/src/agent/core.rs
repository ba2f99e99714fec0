//! The agent's decisions, free of I/O: [`Core::handle`] takes the time (monotonic and wall clock)
//! and one [`Event`] (a check result, a neighbour report, an admin request, a reload, a tick) and
//! returns the [`Effect`]s the shell must carry out (start or stop checks, attach or detach, run
//! hooks, persist state, log, reply). The only side effect it has itself is programming the maps
//! through its [`MapWriter`], so the same core runs on the pinned maps ([`crate::dataplane::maps::AyaMaps`])
//! in the agent and on [`crate::dataplane::maps::MemMaps`] in unit tests, with a fake clock and no root.
//!
//! Generations: every start of a backend's checks, and every neighbour watch, gets a new
//! generation number. Results and neighbour reports carry the generation they were produced
//! under, and the core ignores those of a generation it has since replaced (a result queued before
//! a reload must not count for the checks that reload started).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use vpnlb_common::{Backend, addr_words};

use crate::agent::control::Response;
use crate::agent::desired::{self, Iface};
use crate::agent::hooks::HookEvent;
use crate::agent::metrics::View;
use crate::agent::neigh::{NeighKey, NeighUpdate, fmt_mac};
use crate::agent::reconcile::{self, Desired, PoolChoice};
use crate::agent::state::{Admin, BackendHealth, BackendState, Health, Transition};
use crate::agent::status;
use crate::agent::{AgentError, chain};
use crate::cluster::Service;
use crate::cluster::etcd::{Command, Update};
use crate::cluster::replicate::Report;
use crate::config::{self, BackendConfig, Config, ConfigError, IdMap};
use crate::dataplane::Dataplane;
use crate::dataplane::attach::AttachMode;
use crate::dataplane::maps::{MapReader, MapWriter};
use crate::health::{CheckResult, CheckSpec, CheckTarget};
use member::Member;

/// The label of the pseudo-check that keeps a backend without a configured `mac` out of service
/// until its next-hop MAC is known.
pub const NEIGH_CHECK: &str = "neigh";

/// What the shell knows at start: the config and what the host and the previous agent left.
#[derive(Debug)]
pub struct Start {
    pub cfg: Config,
    pub config_path: PathBuf,
    /// The name -> id assignment the previous agent saved, if any.
    pub saved_ids: Option<IdMap>,
    /// Admin overrides (drain, disable) the previous agent saved.
    pub saved_admin: BTreeMap<String, Admin>,
    /// The host's interfaces (ifindex, MAC) that the config names.
    pub ifaces: HashMap<String, Iface>,
    /// One read of the kernel's neighbour table (usable entries).
    pub neighbours: HashMap<NeighKey, [u8; 6]>,
    /// This host's name, for hooks.
    pub host: String,
    pub pid: u32,
    /// A member's last applied service, kept on this host (a restart while etcd is away runs it).
    pub cached_service: Option<Service>,
}

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// A raw check result (or a BFD session state report).
    Check(CheckResult),
    Neigh(NeighUpdate),
    /// Drain, disable, undrain/enable (`Admin::None`) from the control socket.
    Admin {
        backend: String,
        admin: Admin,
    },
    /// A reload (SIGHUP or the control socket).
    Reload(Box<Reload>),
    /// `vpnlb status`.
    Status,
    /// Once a second.
    Tick,
    /// An [`Effect::Attach`] failed.
    AttachFailed {
        iface: String,
        error: String,
    },
    /// From the member's etcd session, with every interface of the host (a service may name any
    /// as a backend's egress).
    Etcd(Box<(Update, HashMap<String, Iface>)>),
    /// From the member's session replication.
    Replication(Report),
}

/// A reload: the config file as the shell read it, and the host's interfaces that config names.
#[derive(Debug)]
pub struct Reload {
    pub cfg: Result<Config, ConfigError>,
    pub ifaces: HashMap<String, Iface>,
    /// Asked for by SIGHUP (no one to reply to: the log is the answer).
    pub by_signal: bool,
}

impl Event {
    /// A reload asked for on the control socket.
    pub fn reload(cfg: Result<Config, ConfigError>, ifaces: HashMap<String, Iface>) -> Event {
        Event::Reload(Box::new(Reload {
            cfg,
            ifaces,
            by_signal: false,
        }))
    }
}

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Run these checks of `backend` (each target carries the backend id, the check's index and
    /// the generation its results must carry). Replaces any checks still running for it.
    StartChecks {
        backend: String,
        checks: Vec<(CheckSpec, CheckTarget)>,
    },
    StopChecks {
        backend: String,
    },
    /// Watch the neighbour table for `key` and report every change with `generation`.
    WatchNeigh {
        backend: String,
        key: NeighKey,
        generation: u64,
    },
    UnwatchNeigh {
        backend: String,
    },
    Attach {
        iface: String,
        mode: AttachMode,
    },
    Detach {
        iface: String,
    },
    Hook(HookEvent),
    PersistIds(IdMap),
    /// The admin overrides to keep across restarts (backends with `Admin::None` are absent).
    PersistAdmin(BTreeMap<String, Admin>),
    /// What the metrics endpoint shows of the agent's state.
    PublishView(View),
    /// One reconcile pass ran (the shell times it); `changed` when it wrote anything.
    MapsApplied {
        why: &'static str,
        changed: bool,
        ring_slots: usize,
        entries: usize,
    },
    Log(Log),
    /// The answer to the request being handled (admin, reload, status).
    Reply(Response),
    /// For the member's etcd session: publish this member's state, set an admin override.
    Etcd(Command),
    /// Keep the service just applied on this host (a restart while etcd is away runs it).
    PersistService(Service),
    /// The peers to replicate sessions to (name -> address), when they change.
    Peers(BTreeMap<String, std::net::SocketAddr>),
}

/// What the agent reports in its log; the shell picks the level and the wording.
#[derive(Debug)]
pub enum Log {
    /// A backend's effective state changed. `initial`: its first conclusion since the agent
    /// started (unknown -> up/down), part of a normal start.
    Transition {
        t: Transition,
        initial: bool,
    },
    /// The pool serving a VIP (or a class) changed. `initial`: the first choice after start.
    Pool {
        vip: String,
        class: Option<String>,
        from: Option<String>,
        to: Option<String>,
        initial: bool,
    },
    /// Every backend has concluded since start (one summary line instead of one per backend).
    Settled {
        up: usize,
        down: usize,
        other: usize,
        after: Duration,
    },
    /// Entries a previous agent left that the config no longer has were removed.
    Pruned {
        vips: usize,
        backends: usize,
    },
    /// A neighbour entry vanished; the backend keeps its known MAC until another one is seen.
    NeighKept {
        backend: String,
        mac: [u8; 6],
    },
    ApplyFailed {
        why: &'static str,
        error: String,
    },
    ReloadRejected {
        error: String,
        by_signal: bool,
    },
    Reloaded {
        restarted: Vec<String>,
        removed: Vec<String>,
        attached: Vec<String>,
        detached: Vec<String>,
    },
    AttachFailed {
        iface: String,
        error: String,
    },
    /// etcd reached again (`up`) or lost.
    Etcd {
        up: bool,
        detail: String,
    },
    EtcdBadValue {
        key: String,
        reason: String,
    },
    ServiceApplied {
        revision: i64,
        detail: String,
    },
    /// A service revision this member refuses; it keeps running the previous one.
    ServiceRefused {
        revision: i64,
        error: String,
    },
    /// Rings that differ from a peer's that should be the same ("ring@peer").
    RingMismatch {
        rings: Vec<String>,
    },
    /// A peer's bulk copy of its sessions was written here.
    PeerSynced {
        peer: String,
    },
}

/// The agent's state and decisions over the maps behind `W`.
pub struct Core<W: MapWriter + MapReader> {
    cfg: Config,
    config_path: PathBuf,
    ids: IdMap,
    /// Backend id -> name (rebuilt with `ids`).
    names: HashMap<u32, String>,
    dp: Dataplane<W>,
    health: Health,
    ifaces: HashMap<String, Iface>,
    /// Next-hop MACs learned for backends without a configured `mac`.
    macs: HashMap<String, [u8; 6]>,
    /// Backend -> generation of its running checks.
    check_gen: HashMap<String, u64>,
    /// Backend -> generation of its neighbour watch (backends without a configured `mac`).
    neigh_gen: HashMap<String, u64>,
    next_gen: u64,
    choices: Vec<PoolChoice>,
    /// (vip, class) pairs that have had a serving pool since start.
    served: BTreeSet<(String, Option<String>)>,
    /// Backends that have not concluded since start (for the start summary); `None` once settled.
    unsettled: Option<BTreeSet<String>>,
    attach_errors: BTreeMap<String, String>,
    host: String,
    pid: u32,
    started: Instant,
    started_wall: SystemTime,
    view_dirty: bool,
    /// The last reconcile failed: the next tick retries it (as does any event that applies).
    apply_pending: bool,
    /// As a member of a cluster (`[cluster]`).
    member: Option<Member>,
}

/// Health entry of `b`: its configured checks (BFD reports already-debounced session state: rise
/// and fall 1) plus, without a configured `mac`, the [`NEIGH_CHECK`] pseudo-check last.
fn health_entry(b: &BackendConfig, id: u32, now: Instant, wall: SystemTime) -> BackendHealth {
    let mut checks: Vec<(String, u32, u32)> = b
        .checks
        .iter()
        .map(|c| match c {
            CheckSpec::Bfd { .. } => (c.label(), 1, 1),
            _ => (c.label(), c.timing().rise, c.timing().fall),
        })
        .collect();
    if b.mac.is_none() {
        checks.push((NEIGH_CHECK.into(), 1, 1));
    }
    BackendHealth::new(&b.name, id, checks, now, wall)
}

fn neigh_key(cfg: &Config, b: &BackendConfig) -> NeighKey {
    (desired::backend_iface(cfg, b).to_string(), b.address)
}

fn id_names(ids: &IdMap) -> HashMap<u32, String> {
    ids.backends
        .iter()
        .map(|(n, id)| (*id, n.clone()))
        .collect()
}

/// Whether a pinned backend entry is the gateway `b` egressing on `ifindex` (same address and
/// egress): only then is its state or MAC adopted.
fn same_gateway(pinned: &Backend, b: &BackendConfig, ifindex: Option<u32>) -> bool {
    let (words, family) = addr_words(b.address);
    pinned.addr == words && pinned.family == family && ifindex.is_none_or(|i| pinned.ifindex == i)
}

impl<W: MapWriter + MapReader> Core<W> {
    /// Builds the core over `maps` (adopting what a previous agent left in them: a backend whose
    /// pinned entry is the same gateway keeps serving, with its pinned MAC if the neighbour table
    /// does not have it yet, until its checks say otherwise), writes the maps, prunes what the
    /// config no longer has, and returns the effects that start everything.
    pub fn start(
        maps: W,
        s: Start,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(Self, Vec<Effect>), AgentError> {
        let mut s = s;
        // A member runs its file merged with the cluster's service: the last one it applied
        // (kept on this host) until etcd says otherwise. Without one it writes nothing.
        let mut member = s.cfg.cluster.clone().map(|c| {
            let started = wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            Member::new(c, s.cfg.clone(), s.pid, started)
        });
        let mut cluster_ids = None;
        if let (Some(m), Some(svc)) = (member.as_mut(), s.cached_service.take()) {
            match m.prepare(&svc) {
                Ok((merged, doc)) => {
                    s.cfg = merged;
                    cluster_ids = svc.ids.clone().filter(|i| i.covers(&s.cfg));
                    m.service = Some((svc, doc));
                }
                // The cached copy no longer fits this host: wait for etcd's.
                Err(e) => m.refused = Some((svc.revision, chain(&e))),
            }
        }
        s.cfg.check_interfaces(|n| s.ifaces.contains_key(n))?;
        let ids = cluster_ids.unwrap_or_else(|| config::assign_ids(&s.cfg, s.saved_ids.as_ref()));
        let pinned: HashMap<u32, Backend> = maps.backends()?.into_iter().collect();
        let mut health = Health::default();
        let mut macs = HashMap::new();
        for b in &s.cfg.backends {
            let id = ids.backend(&b.name).expect("assigned");
            let mut h = health_entry(b, id, now, wall);
            if let Some(a) = s.saved_admin.get(&b.name) {
                h.restore_admin(*a);
            }
            let ifindex = s
                .ifaces
                .get(desired::backend_iface(&s.cfg, b))
                .map(|i| i.ifindex);
            let pin = pinned.get(&id).filter(|p| same_gateway(p, b, ifindex));
            if b.mac.is_none() {
                let mac = s
                    .neighbours
                    .get(&neigh_key(&s.cfg, b))
                    .copied()
                    .or_else(|| pin.map(|p| p.mac).filter(|m| *m != [0; 6]));
                if let Some(m) = mac {
                    macs.insert(b.name.clone(), m);
                    // The pseudo-check's question (is there a MAC to write?) is answered.
                    let idx = h.checks.len() - 1;
                    let r = CheckResult {
                        backend_id: id,
                        check_index: idx,
                        generation: 0,
                        ok: true,
                        latency: None,
                        phases: Vec::new(),
                        detail: format!("lladdr {} at start", fmt_mac(&m)),
                        at: now,
                    };
                    h.on_result(&r, now, wall);
                }
            }
            // Restart: keep serving what was being served until the checks conclude; a backend
            // without a MAC to write cannot serve.
            if let Some(p) = pin
                && (b.mac.is_some() || macs.contains_key(&b.name))
            {
                h.adopt(p.state);
            }
            health.backends.insert(b.name.clone(), h);
        }
        let mut core = Core {
            names: id_names(&ids),
            ids,
            dp: Dataplane::new(maps),
            health,
            ifaces: s.ifaces,
            macs,
            check_gen: HashMap::new(),
            neigh_gen: HashMap::new(),
            next_gen: 0,
            choices: Vec::new(),
            served: BTreeSet::new(),
            unsettled: None,
            attach_errors: BTreeMap::new(),
            host: s.host,
            pid: s.pid,
            started: now,
            started_wall: wall,
            view_dirty: false,
            apply_pending: false,
            member,
            config_path: s.config_path,
            cfg: s.cfg,
        };
        core.unsettled = Some(core.unknown_backends());
        let mut fx = Vec::new();
        core.dp.set_config(desired::global_config(&core.cfg))?;
        if core.member.as_ref().is_none_or(Member::serving) {
            let desired = core.desired()?;
            core.apply_desired("start", &desired, wall, &mut fx)?;
            let (vips, backends) = prune_adopted(core.dp.writer_mut(), &desired)?;
            if vips + backends > 0 {
                fx.push(Effect::Log(Log::Pruned { vips, backends }));
            }
        }
        // else: a member without a service yet leaves the pinned maps as they are (they keep
        // forwarding) until the cluster's service arrives.
        fx.push(Effect::PersistIds(core.ids.clone()));
        for i in &core.cfg.interfaces {
            fx.push(Effect::Attach {
                iface: i.name.clone(),
                mode: i.mode,
            });
        }
        let names: Vec<String> = core.cfg.backends.iter().map(|b| b.name.clone()).collect();
        for n in names {
            core.start_checks(&n, &mut fx);
        }
        core.settle_check(now, &mut fx);
        if core.member.is_some() {
            core.publish(&mut fx);
        }
        Ok((core, fx))
    }

    /// Handles one event at `now` (monotonic) / `wall` (for reports).
    pub fn handle(&mut self, now: Instant, wall: SystemTime, ev: Event) -> Vec<Effect> {
        let mut fx = Vec::new();
        // A failed reconcile is retried once a second (not on every result: a persistent
        // failure would log at the rate of the checks).
        if self.apply_pending && matches!(ev, Event::Tick) {
            self.apply("retry", wall, &mut fx);
        }
        match ev {
            Event::Check(r) => self.on_check(r, now, wall, &mut fx),
            Event::Neigh(u) => self.on_neigh(u, now, wall, &mut fx),
            Event::Admin { backend, admin } => self.on_admin(&backend, admin, now, wall, &mut fx),
            Event::Reload(r) => {
                let Reload {
                    cfg,
                    ifaces,
                    by_signal,
                } = *r;
                match self.reload(cfg, ifaces, now, wall, &mut fx) {
                    Ok(v) => fx.push(Effect::Reply(Response::ok(v))),
                    Err(e) => {
                        let error = chain(&e);
                        fx.push(Effect::Log(Log::ReloadRejected {
                            error: error.clone(),
                            by_signal,
                        }));
                        fx.push(Effect::Reply(Response::err(error)));
                    }
                }
            }
            Event::Status => fx.push(Effect::Reply(Response::ok(status::render(
                &status::Input {
                    cfg: &self.cfg,
                    config_path: &self.config_path,
                    health: &self.health,
                    choices: &self.choices,
                    attach_errors: &self.attach_errors,
                    pid: self.pid,
                    started_wall: self.started_wall,
                    cluster: self.member_status(),
                },
                now,
            )))),
            Event::Tick => {
                if self.view_dirty {
                    fx.push(self.view());
                }
            }
            Event::AttachFailed { iface, error } => {
                self.attach_errors.insert(iface.clone(), error.clone());
                fx.push(Effect::Log(Log::AttachFailed { iface, error }));
            }
            Event::Etcd(e) => {
                let (u, ifaces) = *e;
                self.on_etcd(u, ifaces, now, wall, &mut fx);
            }
            Event::Replication(r) => self.on_replication(r, &mut fx),
        }
        self.settle_check(now, &mut fx);
        if self.member.is_some() {
            self.publish(&mut fx);
            self.compare_rings(wall, &mut fx);
            self.peers_changed(&mut fx);
        }
        fx
    }

    pub fn dataplane(&self) -> &Dataplane<W> {
        &self.dp
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn ids(&self) -> &IdMap {
        &self.ids
    }

    /// The pool serving each VIP and class.
    pub fn choices(&self) -> &[PoolChoice] {
        &self.choices
    }

    /// The next-hop MAC in use for a backend without a configured `mac`.
    pub fn learned_mac(&self, backend: &str) -> Option<[u8; 6]> {
        self.macs.get(backend).copied()
    }

    fn desired(&self) -> Result<Desired, AgentError> {
        desired::desired(&self.cfg, &self.ids, &self.ifaces, &self.macs)
    }

    fn view(&mut self) -> Effect {
        self.view_dirty = false;
        Effect::PublishView(View {
            backends: self.health.backends.values().cloned().collect(),
            vips: self
                .cfg
                .vips
                .iter()
                .filter_map(|v| self.ids.vip(&v.name).map(|id| (v.name.clone(), id)))
                .collect(),
            pools: self.choices.clone(),
            cluster: self.cluster_view(),
        })
    }

    /// Reconciles the maps with the desired state under the current health; reports pool changes.
    fn apply(&mut self, why: &'static str, wall: SystemTime, fx: &mut Vec<Effect>) {
        let r = self
            .desired()
            .and_then(|d| self.apply_desired(why, &d, wall, fx));
        self.apply_pending = r.is_err();
        if let Err(e) = r {
            fx.push(Effect::Log(Log::ApplyFailed {
                why,
                error: chain(&e),
            }));
        }
    }

    fn apply_desired(
        &mut self,
        why: &'static str,
        desired: &Desired,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) -> Result<(), AgentError> {
        let r = reconcile::reconcile(&mut self.dp, desired, &self.health)?;
        if self.member.is_some() {
            let hashes = self.ring_hashes();
            if let Some(m) = self.member.as_mut() {
                m.rings = hashes;
            }
        }
        fx.push(Effect::MapsApplied {
            why,
            changed: r.backends_written + r.vips_written + r.removed_vips + r.removed_backends > 0,
            ring_slots: r.report.ring_slots_written,
            entries: r.report.maps_written,
        });
        for new in &r.choices {
            let key = (new.vip.clone(), new.class.clone());
            let old = self
                .choices
                .iter()
                .find(|o| o.vip == new.vip && o.class == new.class)
                .map(|o| o.pool.clone());
            let initial = new.pool.is_some() && !self.served.contains(&key);
            if new.pool.is_some() {
                self.served.insert(key);
            }
            match old {
                Some(old) if old != new.pool => {
                    let from = PoolChoice {
                        vip: new.vip.clone(),
                        class: new.class.clone(),
                        pool: old.clone(),
                        // (the event names the pools only)
                        standby: false,
                    };
                    fx.push(Effect::Log(Log::Pool {
                        vip: new.vip.clone(),
                        class: new.class.clone(),
                        from: old,
                        to: new.pool.clone(),
                        initial,
                    }));
                    fx.push(Effect::Hook(HookEvent::failover(
                        &from, new, &self.host, wall,
                    )));
                }
                _ => {}
            }
        }
        self.choices = r.choices;
        fx.push(self.view());
        Ok(())
    }

    fn transition(&mut self, t: Transition, fx: &mut Vec<Effect>) {
        let initial = t.from == BackendState::Unknown
            && self
                .unsettled
                .as_ref()
                .is_some_and(|u| u.contains(&t.backend));
        if let Some(u) = &mut self.unsettled {
            u.remove(&t.backend);
        }
        fx.push(Effect::Hook(HookEvent::backend_state(&t, &self.host)));
        fx.push(Effect::Log(Log::Transition { t, initial }));
    }

    /// Backends no check has concluded on yet.
    fn unknown_backends(&self) -> BTreeSet<String> {
        self.health
            .backends
            .values()
            .filter(|h| h.state == BackendState::Unknown)
            .map(|h| h.name.clone())
            .collect()
    }

    /// Once every backend has concluded since start: one summary line.
    fn settle_check(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if self.unsettled.as_ref().is_some_and(|u| u.is_empty()) {
            self.unsettled = None;
            if self.health.backends.is_empty() {
                return;
            }
            let count = |s: BackendState| {
                self.health
                    .backends
                    .values()
                    .filter(|h| h.state == s)
                    .count()
            };
            let (up, down) = (count(BackendState::Up), count(BackendState::Down));
            fx.push(Effect::Log(Log::Settled {
                up,
                down,
                other: self.health.backends.len() - up - down,
                after: now.saturating_duration_since(self.started),
            }));
        }
    }

    fn on_check(&mut self, r: CheckResult, now: Instant, wall: SystemTime, fx: &mut Vec<Effect>) {
        let Some(name) = self.names.get(&r.backend_id).cloned() else {
            return;
        };
        if self.check_gen.get(&name) != Some(&r.generation) {
            return;
        }
        let Some(b) = self.health.backends.get_mut(&name) else {
            return;
        };
        // The neighbour pseudo-check is fed only by neighbour reports.
        if b.checks
            .get(r.check_index)
            .is_none_or(|c| c.label == NEIGH_CHECK)
        {
            return;
        }
        let before = b.health();
        let t = b.on_result(&r, now, wall);
        let moved = b.health() != before;
        if let Some(t) = t {
            self.transition(t, fx);
            self.apply("health", wall, fx);
        } else if moved && self.member.is_some() {
            // A member's own view changed: it counts towards the agreement (and is published).
            self.agree_one(&name, now, wall, fx);
        } else {
            // Copying every backend's health into the metrics view per result would cost O(n)
            // per probe (O(n^2) per second with n backends): the tick refreshes it.
            self.view_dirty = true;
        }
    }

    fn on_neigh(&mut self, u: NeighUpdate, now: Instant, wall: SystemTime, fx: &mut Vec<Effect>) {
        if self.neigh_gen.get(&u.backend) != Some(&u.generation) {
            return;
        }
        let known = self.macs.get(&u.backend).copied();
        let (ok, detail, changed) = match (u.mac, known) {
            (Some(m), k) => {
                self.macs.insert(u.backend.clone(), m);
                (true, u.detail, k != Some(m))
            }
            // The entry aged out or is being re-resolved: the MAC we have is still the best
            // knowledge (the gateway's own checks say whether it is alive).
            (None, Some(m)) => {
                fx.push(Effect::Log(Log::NeighKept {
                    backend: u.backend.clone(),
                    mac: m,
                }));
                (
                    true,
                    format!("{}; keeping lladdr {}", u.detail, fmt_mac(&m)),
                    false,
                )
            }
            (None, None) => (false, u.detail, false),
        };
        let Some(b) = self.health.backends.get_mut(&u.backend) else {
            return;
        };
        let Some(idx) = b.checks.iter().position(|c| c.label == NEIGH_CHECK) else {
            return;
        };
        let r = CheckResult {
            backend_id: b.id,
            check_index: idx,
            generation: u.generation,
            ok,
            latency: None,
            phases: Vec::new(),
            detail,
            at: now,
        };
        let before = b.health();
        let t = b.on_result(&r, now, wall);
        let moved = b.health() != before;
        let transitioned = t.is_some();
        if let Some(t) = t {
            self.transition(t, fx);
        } else if moved && self.member.is_some() {
            self.agree_one(&u.backend, now, wall, fx);
        } else {
            self.view_dirty = true;
        }
        if changed || transitioned {
            self.apply("neighbour", wall, fx);
        }
    }

    fn on_admin(
        &mut self,
        backend: &str,
        admin: Admin,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) {
        if self.member.is_some() {
            self.admin_request(backend, admin, fx);
            return;
        }
        let Some(b) = self.health.backends.get_mut(backend) else {
            fx.push(Effect::Reply(Response::err(format!(
                "unknown backend {backend:?}"
            ))));
            return;
        };
        let t = b.set_admin(admin, now, wall);
        let state = b.state;
        let changed = t.is_some();
        if let Some(t) = t {
            self.transition(t, fx);
        }
        fx.push(self.persist_admin());
        let before = fx.len();
        self.apply("admin", wall, fx);
        let failed = fx[before..].iter().find_map(|e| match e {
            Effect::Log(Log::ApplyFailed { error, .. }) => Some(error.clone()),
            _ => None,
        });
        fx.push(Effect::Reply(match failed {
            Some(e) => Response::err(format!("maps not updated: {e}")),
            None => Response::ok(serde_json::json!({
                "backend": backend, "state": state, "changed": changed,
            })),
        }));
    }

    fn persist_admin(&self) -> Effect {
        Effect::PersistAdmin(
            self.health
                .backends
                .iter()
                .filter(|(_, h)| h.admin != Admin::None)
                .map(|(n, h)| (n.clone(), h.admin))
                .collect(),
        )
    }

    fn generation(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    /// Starts checks (and, without a configured MAC, the neighbour watch) of backend `name`
    /// under new generations.
    fn start_checks(&mut self, name: &str, fx: &mut Vec<Effect>) {
        let Some(b) = self.cfg.backends.iter().find(|b| b.name == name).cloned() else {
            return;
        };
        let id = self.ids.backend(&b.name).expect("assigned");
        let generation = self.generation();
        self.check_gen.insert(b.name.clone(), generation);
        let checks = b
            .checks
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                (
                    super::probe_env::bind(spec, &self.cfg, &b),
                    CheckTarget {
                        backend_id: id,
                        check_index: i,
                        generation,
                        addr: b.address,
                        source: None,
                        interface: None,
                    },
                )
            })
            .collect();
        fx.push(Effect::StartChecks {
            backend: b.name.clone(),
            checks,
        });
        if b.mac.is_none() {
            let generation = self.generation();
            self.neigh_gen.insert(b.name.clone(), generation);
            fx.push(Effect::WatchNeigh {
                backend: b.name.clone(),
                key: neigh_key(&self.cfg, &b),
                generation,
            });
        }
    }

    fn stop_checks(&mut self, name: &str, fx: &mut Vec<Effect>) {
        self.check_gen.remove(name);
        fx.push(Effect::StopChecks {
            backend: name.to_string(),
        });
        if self.neigh_gen.remove(name).is_some() {
            fx.push(Effect::UnwatchNeigh {
                backend: name.to_string(),
            });
        }
    }

    /// Applies a new config as a delta. On any error nothing has changed.
    fn reload(
        &mut self,
        new: Result<Config, ConfigError>,
        ifaces: HashMap<String, Iface>,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) -> Result<serde_json::Value, AgentError> {
        let new = new?;
        if new.agent.pin_dir != self.cfg.agent.pin_dir
            || new.agent.max_sessions != self.cfg.agent.max_sessions
        {
            return Err(AgentError::Internal(
                "pin_dir and max_sessions cannot change on reload (they define the pinned maps): restart the agent".into(),
            ));
        }
        if new.cluster != self.cfg.cluster {
            return Err(AgentError::Internal(
                "[cluster] cannot change on reload (it names the cluster and this member): restart the agent".into(),
            ));
        }
        // A member's file holds the host's part; the service stays the cluster's.
        let Some(m) = &self.member else {
            return self.apply_config(new, None, ifaces, now, wall, fx);
        };
        let (merged, ids) = m.merge(&new);
        let r = self.apply_config(merged, ids, ifaces, now, wall, fx)?;
        if let Some(m) = &mut self.member {
            m.local = new;
        }
        Ok(r)
    }

    /// Applies a new whole config (and, from the cluster, its id assignment) as a delta. On any
    /// error nothing has changed.
    fn apply_config(
        &mut self,
        new: Config,
        ids: Option<IdMap>,
        ifaces: HashMap<String, Iface>,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) -> Result<serde_json::Value, AgentError> {
        new.check_interfaces(|n| ifaces.contains_key(n))?;
        let ids = match ids {
            Some(ids) if ids.covers(&new) => ids,
            _ => config::assign_ids(&new, Some(&self.ids)),
        };
        // Dry run: the new desired state must resolve before anything changes.
        desired::desired(&new, &ids, &ifaces, &self.macs)?;

        let old = std::mem::replace(&mut self.cfg, new);
        let old_ids = std::mem::replace(&mut self.ids, ids);
        self.names = id_names(&self.ids);
        self.ifaces = ifaces;
        // Backends: restart checks of new or changed ones, keep the health of unchanged ones.
        let mut restarted = Vec::new();
        for b in self.cfg.backends.clone() {
            let before = old.backends.iter().find(|o| o.name == b.name);
            let same_id = old_ids.backend(&b.name) == self.ids.backend(&b.name);
            let same_target = same_id
                && before.is_some_and(|o| {
                    o.address == b.address && o.mac == b.mac && o.interface == b.interface
                });
            if same_target && before.is_some_and(|o| o.checks == b.checks) {
                continue;
            }
            // Same gateway (address, MAC, egress, id), other checks: it keeps serving, with its
            // learned MAC, until the new checks conclude, as after a restart. Otherwise it starts
            // from scratch (unknown: no new flows until its checks conclude).
            let mac = self.macs.get(&b.name).copied();
            self.stop_checks(&b.name, fx);
            self.macs.remove(&b.name);
            let old_health = self.health.backends.get(&b.name).cloned();
            let admin = old_health.as_ref().map(|h| h.admin).unwrap_or_default();
            let id = self.ids.backend(&b.name).expect("assigned");
            let mut h = health_entry(&b, id, now, wall);
            h.admin = admin;
            if same_target && let Some(o) = &old_health {
                h.carry_over(o);
                if let (Some(m), None) = (mac, b.mac) {
                    self.macs.insert(b.name.clone(), m);
                }
            }
            self.health.backends.insert(b.name.clone(), h);
            self.start_checks(&b.name, fx);
            restarted.push(b.name.clone());
        }
        let gone: Vec<String> = old
            .backends
            .iter()
            .map(|b| b.name.clone())
            .filter(|n| !self.cfg.backends.iter().any(|b| &b.name == n))
            .collect();
        for n in &gone {
            self.stop_checks(n, fx);
            self.macs.remove(n);
            self.health.backends.remove(n);
            if let Some(u) = &mut self.unsettled {
                u.remove(n);
            }
        }
        if let Some(u) = &mut self.unsettled {
            for n in &restarted {
                if self.health.state(n) == Some(BackendState::Unknown) {
                    u.insert(n.clone());
                }
            }
        }
        // Maps first, then the links: a new interface's program finds its VIPs in place.
        if let Err(e) = self.dp.set_config(desired::global_config(&self.cfg)) {
            fx.push(Effect::Log(Log::ApplyFailed {
                why: "reload",
                error: chain(&e),
            }));
        }
        self.apply("reload", wall, fx);
        let attached: Vec<String> = self
            .cfg
            .interfaces
            .iter()
            .filter(|i| !old.interfaces.iter().any(|o| o.name == i.name))
            .map(|i| i.name.clone())
            .collect();
        let detached: Vec<String> = old
            .interfaces
            .iter()
            .filter(|o| !self.cfg.interfaces.iter().any(|i| i.name == o.name))
            .map(|o| o.name.clone())
            .collect();
        for i in self
            .cfg
            .interfaces
            .iter()
            .filter(|i| attached.contains(&i.name))
        {
            fx.push(Effect::Attach {
                iface: i.name.clone(),
                mode: i.mode,
            });
        }
        for name in &detached {
            self.attach_errors.remove(name);
            fx.push(Effect::Detach {
                iface: name.clone(),
            });
        }
        fx.push(Effect::PersistIds(self.ids.clone()));
        fx.push(self.persist_admin());
        fx.push(Effect::Log(Log::Reloaded {
            restarted: restarted.clone(),
            removed: gone.clone(),
            attached,
            detached,
        }));
        Ok(serde_json::json!({ "restarted_checks": restarted, "removed_backends": gone }))
    }
}

/// Removes map entries a previous agent left that the config no longer has: VIPs first, then
/// their rings, then backends (make-before-break in reverse). Returns (VIPs, backends) removed.
fn prune_adopted<W: MapWriter + MapReader>(
    w: &mut W,
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
        if b.state != vpnlb_common::BACKEND_UNUSED && !wanted_backends.contains(&id) {
            w.clear_backend(id)?;
            backends += 1;
        }
    }
    Ok((vips, backends))
}

mod member;

#[cfg(test)]
mod member_tests;
#[cfg(test)]
mod tests;
