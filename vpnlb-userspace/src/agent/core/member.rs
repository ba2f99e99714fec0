//! The core as a member of a cluster (`[cluster]`): the service comes from etcd and replaces the
//! host file's (empty) backends and VIPs; the health of every backend is agreed by quorum over
//! the members' published views; admin overrides are cluster-wide; this member publishes its own
//! view, the revision it runs and the hash of every ring, and compares its rings with the peers
//! that should have the same. Pure like the rest of the core: etcd's updates come in as events,
//! what to publish or write goes out as effects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Instant, SystemTime};

use serde_json::json;

use super::{Core, Effect, Log};
use crate::agent::desired::Iface;
use crate::agent::hooks::HookEvent;
use crate::agent::state::{Admin, BackendState};
use crate::agent::{AgentError, chain};
use crate::cluster::etcd::{Command, Snapshot, Update};
use crate::cluster::quorum::{self, Seen};
use crate::cluster::replicate::Report;
use crate::cluster::{MemberState, Role, Service, ring_hash};
use crate::config::{self, ClusterConfig, Config, IdMap, OnEtcdLoss, ServiceDoc};
use crate::dataplane::maps::{MapReader, MapWriter};

/// What the core keeps as a member.
#[derive(Debug)]
pub struct Member {
    pub cfg: ClusterConfig,
    pub name: String,
    /// The host's own file (no backends or VIPs).
    pub local: Config,
    /// The service in force (and its parsed form), once one has been applied.
    pub service: Option<(Service, ServiceDoc)>,
    /// The latest revision refused, and why.
    pub refused: Option<(i64, String)>,
    pub etcd_up: bool,
    /// Whether a connection was ever tried (the first failure is reported too).
    pub etcd_tried: bool,
    /// The other members, as they publish themselves.
    pub peers: BTreeMap<String, MemberState>,
    /// Admin overrides as etcd has them.
    pub admin: BTreeMap<String, Admin>,
    pub published: Option<MemberState>,
    /// Ring key ("vip" or "vip/class") -> hash, as last written.
    pub rings: BTreeMap<String, String>,
    /// Rings that differ from a peer that should have the same: "ring@peer".
    pub mismatch: BTreeSet<String>,
    /// Values in etcd that could not be read.
    pub bad_values: u64,
    pub pid: u32,
    pub started_unix: u64,
    /// Peers whose bulk copy of their sessions has been written here.
    pub synced: BTreeSet<String>,
    /// The peers last handed to replication.
    pub replicating_to: BTreeMap<String, std::net::SocketAddr>,
    /// Replication's recent lag (ms, p50 and p99), as last reported.
    pub lag_ms: Option<(f64, f64)>,
}

fn admin_of(v: &str) -> Admin {
    match v {
        "drain" => Admin::Drain,
        "disable" => Admin::Disable,
        _ => Admin::None,
    }
}

pub fn admin_value(a: Admin) -> Option<String> {
    match a {
        Admin::None => None,
        Admin::Drain => Some("drain".into()),
        Admin::Disable => Some("disable".into()),
    }
}

fn seen(s: BackendState) -> Seen {
    match s {
        BackendState::Up => Seen::Up,
        BackendState::Down => Seen::Down,
        _ => Seen::Unknown,
    }
}

fn state_of(s: Seen) -> BackendState {
    match s {
        Seen::Up => BackendState::Up,
        Seen::Down => BackendState::Down,
        Seen::Unknown => BackendState::Unknown,
    }
}

impl Member {
    pub fn new(cfg: ClusterConfig, local: Config, pid: u32, started_unix: u64) -> Member {
        Member {
            name: cfg.member_name(),
            cfg,
            local,
            service: None,
            refused: None,
            etcd_up: false,
            etcd_tried: false,
            peers: BTreeMap::new(),
            admin: BTreeMap::new(),
            published: None,
            rings: BTreeMap::new(),
            mismatch: BTreeSet::new(),
            bad_values: 0,
            pid,
            started_unix,
            synced: BTreeSet::new(),
            replicating_to: BTreeMap::new(),
            lag_ms: None,
        }
    }

    fn origin(&self, revision: i64) -> String {
        format!("etcd {}/service (revision {revision})", self.cfg.prefix())
    }

    /// The host file `local` with the service in force (if any) and the cluster's ids for it.
    pub fn merge(&self, local: &Config) -> (Config, Option<IdMap>) {
        match &self.service {
            Some((svc, doc)) => (
                local.with_service(doc, &svc.text, &self.origin(svc.revision)),
                svc.ids.clone(),
            ),
            None => (local.clone(), None),
        }
    }

    /// Parses a service and merges it with the host file.
    pub fn prepare(&self, svc: &Service) -> Result<(Config, ServiceDoc), AgentError> {
        let origin = self.origin(svc.revision);
        let doc = config::parse_service(&svc.text, &origin)?;
        Ok((self.local.with_service(&doc, &svc.text, &origin), doc))
    }

    /// Whether this member has a service to run (a member without one writes nothing).
    pub fn serving(&self) -> bool {
        self.service.is_some()
    }
}

impl<W: MapWriter + MapReader> Core<W> {
    /// One update from the etcd session. `ifaces`: every interface of the host (a service may
    /// name any as a backend's egress).
    pub(super) fn on_etcd(
        &mut self,
        u: Update,
        ifaces: HashMap<String, Iface>,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) {
        let Some(m) = self.member.as_mut() else {
            return;
        };
        match u {
            Update::Snapshot(s) => {
                let was_up = m.etcd_up;
                m.etcd_up = true;
                m.etcd_tried = true;
                if !was_up {
                    fx.push(Effect::Log(Log::Etcd {
                        up: true,
                        detail: format!("{} members seen", s.members.len()),
                    }));
                }
                self.on_snapshot(s, ifaces, now, wall, fx);
            }
            Update::Service(svc) => self.on_service(svc, ifaces, now, wall, fx),
            Update::Admin { backend, value } => {
                let a = value.as_deref().map(admin_of).unwrap_or(Admin::None);
                match a {
                    Admin::None => m.admin.remove(&backend),
                    a => m.admin.insert(backend.clone(), a),
                };
                self.admin_from_cluster(&backend, a, now, wall, fx);
            }
            Update::Member { name, state } => {
                if name == m.name {
                    return;
                }
                match state {
                    Some(s) => m.peers.insert(name, s),
                    None => m.peers.remove(&name),
                };
                self.agree(now, wall, fx);
                self.compare_rings(wall, fx);
            }
            Update::Bad { key, reason } => {
                m.bad_values += 1;
                fx.push(Effect::Log(Log::EtcdBadValue { key, reason }));
            }
            Update::Lost { error } => {
                let first = !m.etcd_tried;
                let was_up = m.etcd_up;
                m.etcd_up = false;
                m.etcd_tried = true;
                if was_up || first {
                    fx.push(Effect::Log(Log::Etcd {
                        up: false,
                        detail: error,
                    }));
                }
                if m.cfg.on_etcd_loss == OnEtcdLoss::Local {
                    // This host's own checks decide until etcd is back.
                    let names: Vec<String> = self.health.backends.keys().cloned().collect();
                    let mut changed = false;
                    for n in names {
                        let b = self.health.backends.get_mut(&n).expect("listed");
                        if let Some(t) = b.set_agreed(
                            None,
                            "etcd lost: this host's checks decide (on_etcd_loss = local)".into(),
                            now,
                            wall,
                        ) {
                            self.transition(t, fx);
                            changed = true;
                        }
                    }
                    if changed {
                        self.apply("etcd lost", wall, fx);
                    }
                }
            }
        }
        self.view_dirty = true;
    }

    fn on_snapshot(
        &mut self,
        s: Snapshot,
        ifaces: HashMap<String, Iface>,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) {
        let m = self.member.as_mut().expect("member");
        m.peers = s.members;
        m.peers.remove(&m.name);
        m.bad_values += s.bad.len() as u64;
        for (key, reason) in s.bad {
            fx.push(Effect::Log(Log::EtcdBadValue { key, reason }));
        }
        let admin: BTreeMap<String, Admin> = s
            .admin
            .iter()
            .map(|(b, v)| (b.clone(), admin_of(v)))
            .collect();
        m.admin = admin.clone();
        if let Some(svc) = s.service
            && m.service
                .as_ref()
                .is_none_or(|(cur, _)| cur.revision != svc.revision)
            && m.refused.as_ref().is_none_or(|(r, _)| *r != svc.revision)
        {
            self.on_service(svc, ifaces, now, wall, fx);
        }
        let names: Vec<String> = self.health.backends.keys().cloned().collect();
        for n in names {
            let a = admin.get(&n).copied().unwrap_or(Admin::None);
            self.admin_from_cluster(&n, a, now, wall, fx);
        }
        self.agree(now, wall, fx);
        self.compare_rings(wall, fx);
    }

    fn on_service(
        &mut self,
        svc: Service,
        ifaces: HashMap<String, Iface>,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) {
        let m = self.member.as_ref().expect("member");
        let first = !m.serving();
        let r = m.prepare(&svc).and_then(|(cfg, doc)| {
            let v = self.apply_config(cfg, svc.ids.clone(), ifaces, now, wall, fx)?;
            Ok((v, doc))
        });
        let m = self.member.as_mut().expect("member");
        match r {
            Ok((v, doc)) => {
                m.refused = None;
                fx.push(Effect::Log(Log::ServiceApplied {
                    revision: svc.revision,
                    detail: v.to_string(),
                }));
                fx.push(Effect::PersistService(svc.clone()));
                m.service = Some((svc, doc));
                if first {
                    // Ready only once the service's backends have concluded.
                    self.unsettled = Some(self.unknown_backends());
                    // Only now that the service is known is it safe to remove what a previous
                    // agent left that the service does not have.
                    match self.desired() {
                        Ok(d) => match super::prune_adopted(self.dp.writer_mut(), &d) {
                            Ok((vips, backends)) if vips + backends > 0 => {
                                fx.push(Effect::Log(Log::Pruned { vips, backends }))
                            }
                            Ok(_) => {}
                            Err(e) => fx.push(Effect::Log(Log::ApplyFailed {
                                why: "prune",
                                error: chain(&e),
                            })),
                        },
                        Err(e) => fx.push(Effect::Log(Log::ApplyFailed {
                            why: "prune",
                            error: chain(&e),
                        })),
                    }
                }
                let admin = self.member.as_ref().expect("member").admin.clone();
                let names: Vec<String> = self.health.backends.keys().cloned().collect();
                for n in names {
                    let a = admin.get(&n).copied().unwrap_or(Admin::None);
                    self.admin_from_cluster(&n, a, now, wall, fx);
                }
                self.agree(now, wall, fx);
            }
            Err(e) => {
                let error = chain(&e);
                fx.push(Effect::Log(Log::ServiceRefused {
                    revision: svc.revision,
                    error: error.clone(),
                }));
                fx.push(Effect::Hook(HookEvent::service_refused(
                    &self.host,
                    svc.revision,
                    &error,
                    wall,
                )));
                m.refused = Some((svc.revision, error));
            }
        }
        self.view_dirty = true;
    }

    /// Applies an admin override that came from etcd.
    fn admin_from_cluster(
        &mut self,
        backend: &str,
        admin: Admin,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) {
        let Some(b) = self.health.backends.get_mut(backend) else {
            return;
        };
        if b.admin == admin {
            return;
        }
        if let Some(t) = b.set_admin(admin, now, wall) {
            self.transition(t, fx);
        }
        fx.push(self.persist_admin());
        self.apply("admin", wall, fx);
    }

    /// Recomputes the agreed health of every backend from the live members' views (this one's
    /// included) and applies what changed. While etcd is lost nothing changes here (freeze), or
    /// this host's checks decide (`on_etcd_loss = "local"`, see `Update::Lost`).
    pub(super) fn agree(&mut self, now: Instant, wall: SystemTime, fx: &mut Vec<Effect>) {
        let names: Vec<String> = self.health.backends.keys().cloned().collect();
        self.agree_on(&names, now, wall, fx);
    }

    /// [`Core::agree`] for one backend (this member's own view of it changed).
    pub(super) fn agree_one(
        &mut self,
        backend: &str,
        now: Instant,
        wall: SystemTime,
        fx: &mut Vec<Effect>,
    ) {
        self.agree_on(&[backend.to_string()], now, wall, fx);
    }

    fn agree_on(&mut self, names: &[String], now: Instant, wall: SystemTime, fx: &mut Vec<Effect>) {
        let Some(m) = self.member.as_ref() else {
            return;
        };
        if !m.etcd_up {
            return;
        }
        let live = m.peers.len() + 1;
        let q = quorum::quorum(m.cfg.health_quorum, live);
        let own = m.name.clone();
        let peers: Vec<(String, BTreeMap<String, Seen>)> = m
            .peers
            .iter()
            .map(|(n, s)| (n.clone(), s.health.clone()))
            .collect();
        let mut changed = false;
        for n in names {
            let Some(b) = self.health.backends.get_mut(n) else {
                continue;
            };
            let mut views: BTreeMap<String, Seen> = BTreeMap::new();
            views.insert(own.clone(), seen(b.health()));
            for (peer, h) in &peers {
                views.insert(peer.clone(), h.get(n).copied().unwrap_or(Seen::Unknown));
            }
            let previous = seen(b.agreed.unwrap_or_else(|| b.health()));
            let (agreed, who) = quorum::agree(&views, q, previous);
            let new = Some(state_of(agreed));
            if b.agreed == new {
                continue;
            }
            let reason = if who.is_empty() {
                format!("cluster: no quorum of {q} either way; keeping {agreed:?}")
            } else {
                format!(
                    "cluster: {} of {live} members see it {} ({})",
                    who.len(),
                    state_of(agreed),
                    who.join(", ")
                )
            };
            if let Some(t) = b.set_agreed(new, reason, now, wall) {
                self.transition(t, fx);
                changed = true;
            }
        }
        if changed {
            self.apply("quorum", wall, fx);
        }
    }

    /// Ring hashes of what is written now ("vip" or "vip/class" -> hash); computed after every
    /// reconcile (a hash reads every slot).
    pub(super) fn ring_hashes(&self) -> BTreeMap<String, String> {
        self.ids
            .rings
            .iter()
            .filter_map(|(k, id)| {
                let slots = self.dp.installed_ring(*id)?;
                let name = match &k.class {
                    Some(c) => format!("{}/{c}", k.vip),
                    None => k.vip.clone(),
                };
                Some((name, ring_hash(slots)))
            })
            .collect()
    }

    /// What the rings are built from, as a digest: members with the same service revision and
    /// the same digest must have written the same rings.
    fn agreed_digest(&self) -> String {
        let mut s = String::new();
        for (n, b) in &self.health.backends {
            s.push_str(&format!("{n}={};", b.state.serves_new_flows()));
        }
        ring_hash(&s.bytes().map(u32::from).collect::<Vec<_>>())
    }

    /// This member's state as it publishes it.
    fn member_state(&self) -> Option<MemberState> {
        let m = self.member.as_ref()?;
        // Ready once it runs the service, its checks have concluded, and (replicating) it holds
        // the sessions of every peer that is itself ready.
        let role = if !m.serving() {
            Role::Waiting
        } else if self.unsettled.is_some() {
            Role::Checking
        } else if m.cfg.replicate
            && !m
                .peers
                .iter()
                .filter(|(_, p)| p.ready)
                .all(|(n, _)| m.synced.contains(n))
        {
            Role::Syncing
        } else {
            Role::Ready
        };
        Some(MemberState {
            member: m.name.clone(),
            peer: m.cfg.advertised().to_string(),
            pid: m.pid,
            started: m.started_unix,
            service_revision: m.service.as_ref().map_or(0, |(s, _)| s.revision),
            service_error: m
                .refused
                .as_ref()
                .map(|(r, e)| format!("revision {r}: {e}")),
            health: self
                .health
                .backends
                .iter()
                .map(|(n, b)| (n.clone(), seen(b.health())))
                .collect(),
            agreed: self.agreed_digest(),
            rings: m.rings.clone(),
            ready: role == Role::Ready,
            role,
            replication_lag_ms_p50: m.lag_ms.map(|l| l.0),
            replication_lag_ms_p99: m.lag_ms.map(|l| l.1),
        })
    }

    /// Publishes this member's state when it changed (after every event).
    pub(super) fn publish(&mut self, fx: &mut Vec<Effect>) {
        let Some(state) = self.member_state() else {
            return;
        };
        let m = self.member.as_mut().expect("member");
        if m.published.as_ref() != Some(&state) {
            m.published = Some(state.clone());
            fx.push(Effect::Etcd(Command::Publish(state)));
        }
    }

    /// Compares this member's rings with those of every peer that runs the same revision with
    /// the same agreed health: any difference is an alarm.
    pub(super) fn compare_rings(&mut self, wall: SystemTime, fx: &mut Vec<Effect>) {
        let Some(own) = self.member_state() else {
            return;
        };
        let m = self.member.as_mut().expect("member");
        let own_rings = m.rings.clone();
        let mut now_mismatch = BTreeSet::new();
        for (peer, s) in &m.peers {
            if s.service_revision != own.service_revision
                || s.agreed != own.agreed
                || own.service_revision == 0
            {
                continue;
            }
            for (ring, h) in &own_rings {
                if s.rings.get(ring).is_some_and(|ph| ph != h) {
                    now_mismatch.insert(format!("{ring}@{peer}"));
                }
            }
        }
        let new: Vec<String> = now_mismatch.difference(&m.mismatch).cloned().collect();
        m.mismatch = now_mismatch;
        if !new.is_empty() {
            fx.push(Effect::Log(Log::RingMismatch { rings: new.clone() }));
            fx.push(Effect::Hook(HookEvent::ring_mismatch(
                &self.host, &new, wall,
            )));
        }
    }

    /// An admin request on this member's control socket: cluster-wide, so it goes to etcd (and
    /// comes back through the watch to every member, this one included).
    pub(super) fn admin_request(&mut self, backend: &str, admin: Admin, fx: &mut Vec<Effect>) {
        let m = self.member.as_ref().expect("member");
        if !self.health.backends.contains_key(backend) {
            fx.push(Effect::Reply(crate::agent::control::Response::err(
                format!("unknown backend {backend:?}"),
            )));
            return;
        }
        if !m.etcd_up {
            fx.push(Effect::Reply(crate::agent::control::Response::err(
                "etcd is unreachable: admin changes are cluster-wide and need etcd (the running state stays)",
            )));
            return;
        }
        fx.push(Effect::Etcd(Command::SetAdmin {
            backend: backend.to_string(),
            value: admin_value(admin),
        }));
        let state = self.health.state(backend);
        fx.push(Effect::Reply(crate::agent::control::Response::ok(json!({
            "backend": backend,
            "state": state,
            "requested": admin_value(admin).unwrap_or_else(|| "none".into()),
            "cluster": true,
        }))));
    }

    /// A report from replication.
    pub(super) fn on_replication(&mut self, r: Report, fx: &mut Vec<Effect>) {
        let Some(m) = self.member.as_mut() else {
            return;
        };
        match r {
            Report::Synced { peer } => {
                if m.synced.insert(peer.clone()) {
                    fx.push(Effect::Log(Log::PeerSynced { peer }));
                }
            }
            // Logged where it happened; the counter is in the metrics.
            Report::Refused { .. } => {}
            Report::Lag { p50_ms, p99_ms } => m.lag_ms = Some((p50_ms, p99_ms)),
        }
    }

    /// Hands replication the current peers when they changed.
    pub(super) fn peers_changed(&mut self, fx: &mut Vec<Effect>) {
        let Some(m) = self.member.as_mut() else {
            return;
        };
        if !m.cfg.replicate {
            return;
        }
        let peers: BTreeMap<String, std::net::SocketAddr> = m
            .peers
            .iter()
            .filter_map(|(n, p)| p.peer.parse().ok().map(|a| (n.clone(), a)))
            .collect();
        if peers != m.replicating_to {
            m.replicating_to = peers.clone();
            // A peer that left must send its copy again when it returns.
            m.synced.retain(|n| peers.contains_key(n));
            fx.push(Effect::Peers(peers));
        }
    }

    /// The cluster part of the metrics.
    pub(super) fn cluster_view(&self) -> Option<crate::agent::metrics::ClusterView> {
        let m = self.member.as_ref()?;
        Some(crate::agent::metrics::ClusterView {
            etcd_up: m.etcd_up,
            members: m.peers.len() + 1,
            service_revision: m.service.as_ref().map_or(0, |(s, _)| s.revision),
            service_refused: m.refused.is_some(),
            ring_mismatch: m.mismatch.len(),
            bad_values: m.bad_values,
            ready: m.published.as_ref().is_some_and(|p| p.ready),
        })
    }

    /// The cluster part of `vpnlb status`.
    pub(super) fn member_status(&self) -> Option<serde_json::Value> {
        let m = self.member.as_ref()?;
        let live = m.peers.len() + 1;
        Some(json!({
            "name": m.cfg.name,
            "member": m.name,
            "prefix": m.cfg.prefix(),
            "etcd": match (m.etcd_up, m.etcd_tried) {
                (true, _) => "up",
                (false, true) => "lost",
                (false, false) => "connecting",
            },
            "on_etcd_loss": m.cfg.on_etcd_loss.as_str(),
            "service_revision": m.service.as_ref().map_or(0, |(s, _)| s.revision),
            "service_error": m.refused.as_ref().map(|(r, e)| json!({"revision": r, "error": e})),
            "quorum": quorum::quorum(m.cfg.health_quorum, live),
            "members": std::iter::once(m.name.clone()).chain(m.peers.keys().cloned()).collect::<Vec<_>>(),
            // What each peer published: the revision it runs and what its checks see down.
            "peers": m.peers.iter().map(|(n, p)| (n.clone(), json!({
                "service_revision": p.service_revision,
                "ready": p.ready,
                "sees_down": p.health.iter().filter(|(_, s)| **s == Seen::Down).map(|(b, _)| b.clone()).collect::<Vec<_>>(),
            }))).collect::<BTreeMap<_, _>>(),
            "rings": m.rings,
            "ring_mismatch": m.mismatch,
            "bad_values": m.bad_values,
            "synced_from": m.synced,
            "agreed": self.health.backends.iter().map(|(n, b)| (n.clone(), b.agreed)).collect::<BTreeMap<_, _>>(),
        }))
    }
}
