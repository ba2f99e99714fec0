//! The core as a cluster member, on in-memory maps with a fake clock: the service arrives from
//! etcd, health by quorum, admin through etcd, etcd loss, ring comparison, the cached service.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use vpnlb_common::{BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, Backend, addr_words};

use super::*;
use crate::cluster::etcd::{Command, Snapshot, Update};
use crate::cluster::{MemberState, Seen};
use crate::dataplane::maps::{MemMaps, Recording};

const HOST: &str = r#"
[agent]
pin_dir = "/sys/fs/bpf/vpnlb-test"
control_socket = "/run/vpnlb-test/control.sock"

[[interface]]
name = "eth0"

[cluster]
name = "edge"
member = "lb1"
etcd_endpoints = ["http://127.0.0.1:2379"]
peer_listen = "10.0.0.1:7946"
peer_key_file = "/etc/vpnlb/peer.key"
"#;

const SERVICE: &str = r#"
[[backend]]
name = "gw1"
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
[[backend.check]]
type = "icmp"
fall = 1

[[backend]]
name = "gw2"
address = "10.0.0.12"
mac = "02:00:00:00:00:12"
[[backend.check]]
type = "icmp"
fall = 1

[[vip]]
name = "wg"
address = "203.0.113.10"
port = 51820
protocol = "udp"
ring_size = 251

[[vip.pool]]
name = "all"
backends = ["gw1", "gw2"]
"#;

const ETH0: Iface = Iface {
    ifindex: 2,
    mac: [2, 0, 0, 0, 0, 1],
};

fn ifaces() -> HashMap<String, Iface> {
    HashMap::from([("eth0".to_string(), ETH0)])
}

fn service(revision: i64, text: &str) -> Service {
    Service {
        revision,
        text: text.to_string(),
        ids: None,
    }
}

struct Bed {
    core: Core<Recording<MemMaps>>,
    t0: Instant,
    fx: Vec<Effect>,
}

fn start_with(maps: MemMaps, cached: Option<Service>) -> Bed {
    let t0 = Instant::now();
    let (core, fx) = Core::start(
        Recording::new(maps),
        Start {
            cfg: config::parse(HOST, "host.toml").expect("host config"),
            config_path: "/etc/vpnlb/vpnlb.toml".into(),
            saved_ids: None,
            saved_admin: BTreeMap::new(),
            ifaces: ifaces(),
            neighbours: HashMap::new(),
            host: "lb1".into(),
            pid: 7,
            cached_service: cached,
        },
        t0,
        SystemTime::UNIX_EPOCH,
    )
    .expect("start");
    Bed { core, t0, fx }
}

impl Bed {
    fn at(&self, ms: u64) -> (Instant, SystemTime) {
        (
            self.t0 + Duration::from_millis(ms),
            SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
        )
    }

    fn handle(&mut self, ms: u64, ev: Event) -> Vec<Effect> {
        let (now, wall) = self.at(ms);
        let fx = self.core.handle(now, wall, ev);
        self.fx.extend(fx.iter().filter_map(|e| match e {
            Effect::StartChecks { backend, checks } => Some(Effect::StartChecks {
                backend: backend.clone(),
                checks: checks.clone(),
            }),
            _ => None,
        }));
        fx
    }

    fn etcd(&mut self, ms: u64, u: Update) -> Vec<Effect> {
        self.handle(ms, Event::Etcd(Box::new((u, ifaces()))))
    }

    fn snapshot(&mut self, ms: u64, svc: Option<Service>, peers: &[(&str, &[(&str, Seen)])]) {
        let members = peers
            .iter()
            .map(|(n, h)| (n.to_string(), peer(n, h)))
            .collect();
        self.etcd(
            ms,
            Update::Snapshot(Snapshot {
                revision: 10,
                service: svc,
                members,
                ..Default::default()
            }),
        );
    }

    fn check(&mut self, ms: u64, backend: &str, ok: bool) -> Vec<Effect> {
        let (id, generation) = self
            .fx
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::StartChecks { backend: b, checks } if b == backend => {
                    Some((checks[0].1.backend_id, checks[0].1.generation))
                }
                _ => None,
            })
            .expect("checks started");
        let at = self.at(ms).0;
        self.handle(
            ms,
            Event::Check(CheckResult {
                backend_id: id,
                check_index: 0,
                generation,
                ok,
                latency: None,
                detail: if ok {
                    "echo reply".into()
                } else {
                    "timeout".into()
                },
                phases: Vec::new(),
                at,
            }),
        )
    }

    fn maps(&self) -> &MemMaps {
        &self.core.dataplane().writer().inner
    }

    fn ring(&self) -> BTreeSet<u32> {
        let Some(meta) = self.maps().vips.values().next() else {
            return BTreeSet::new();
        };
        self.maps()
            .ring(meta.ring_id, meta.ring_size)
            .unwrap()
            .into_iter()
            .collect()
    }

    fn id(&self, b: &str) -> u32 {
        self.core.ids().backend(b).unwrap()
    }

    fn published(fx: &[Effect]) -> Option<&MemberState> {
        fx.iter().rev().find_map(|e| match e {
            Effect::Etcd(Command::Publish(m)) => Some(m),
            _ => None,
        })
    }
}

fn peer(name: &str, health: &[(&str, Seen)]) -> MemberState {
    MemberState {
        member: name.to_string(),
        peer: "10.0.0.2:7946".into(),
        service_revision: 5,
        health: health.iter().map(|(b, s)| (b.to_string(), *s)).collect(),
        ..Default::default()
    }
}

fn transitions(fx: &[Effect]) -> Vec<(String, BackendState)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Log(Log::Transition { t, .. }) => Some((t.backend.clone(), t.to)),
            _ => None,
        })
        .collect()
}

/// A previous agent's pinned state: gw1 up in a ring of its own VIP.
fn pinned() -> MemMaps {
    let mut b = start_with(MemMaps::new(), Some(service(5, SERVICE)));
    b.check(10, "gw1", true);
    b.check(10, "gw2", true);
    b.maps().clone()
}

#[test]
fn a_member_without_a_service_touches_no_map_until_the_clusters_arrives() {
    let before = pinned();
    assert!(!before.vips.is_empty());
    let mut b = start_with(before.clone(), None);
    assert_eq!(b.maps().vips, before.vips, "nothing pruned");
    assert_eq!(b.maps().backends, before.backends);
    assert!(
        b.fx.iter()
            .all(|e| !matches!(e, Effect::MapsApplied { .. } | Effect::StartChecks { .. }))
    );
    // The service arrives with the first snapshot: applied, kept on the host, published.
    let fx = b.etcd(
        100,
        Update::Snapshot(Snapshot {
            revision: 10,
            service: Some(service(5, SERVICE)),
            ..Default::default()
        }),
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::PersistService(s) if s.revision == 5))
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Log(Log::ServiceApplied { revision: 5, .. })))
    );
    let started: Vec<&str> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::StartChecks { backend, .. } => Some(backend.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(started, ["gw1", "gw2"]);
    let p = Bed::published(&fx).expect("published");
    assert_eq!((p.member.as_str(), p.service_revision), ("lb1", 5));
    assert_eq!(p.peer, "10.0.0.1:7946");
    assert_eq!(p.rings.len(), 1, "{p:?}");
}

#[test]
fn one_member_alone_cannot_take_a_backend_out_two_of_three_can() {
    let mut b = start_with(MemMaps::new(), None);
    b.snapshot(
        0,
        Some(service(5, SERVICE)),
        &[
            ("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Up)]),
            ("lb3", &[("gw1", Seen::Up), ("gw2", Seen::Up)]),
        ],
    );
    b.check(100, "gw1", true);
    b.check(100, "gw2", true);
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw1"), b.id("gw2")]));
    // This member's path to gw2 breaks: 1 of 3 sees it down, it stays in service.
    let fx = b.check(200, "gw2", false);
    assert!(transitions(&fx).is_empty(), "{:?}", transitions(&fx));
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw1"), b.id("gw2")]));
    let p = Bed::published(&fx).expect("the new view is published");
    assert_eq!(p.health["gw2"], Seen::Down);
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().state, BACKEND_UP);
    // lb2 sees it down too: 2 of 3, it leaves the ring.
    let fx = b.etcd(
        300,
        Update::Member {
            name: "lb2".into(),
            state: Some(peer("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Down)])),
        },
    );
    assert_eq!(transitions(&fx), [("gw2".to_string(), BackendState::Down)]);
    let reason = fx
        .iter()
        .find_map(|e| match e {
            Effect::Log(Log::Transition { t, .. }) => Some(t.reason.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        reason.contains("2 of 3 members see it down (lb1, lb2)"),
        "{reason}"
    );
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw1")]));
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().state, BACKEND_DOWN);
    // It comes back the same way: lb2 up again is 1 up, 1 down (lb3 still up): 2 of 3 up.
    let fx = b.etcd(
        400,
        Update::Member {
            name: "lb2".into(),
            state: Some(peer("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Up)])),
        },
    );
    assert_eq!(transitions(&fx), [("gw2".to_string(), BackendState::Up)]);
    assert!(b.ring().contains(&b.id("gw2")));
    // A member that leaves (its lease expired) no longer counts: lb2 and lb3 gone, this member
    // alone decides, and it sees gw2 down.
    b.etcd(
        500,
        Update::Member {
            name: "lb3".into(),
            state: None,
        },
    );
    let fx = b.etcd(
        600,
        Update::Member {
            name: "lb2".into(),
            state: None,
        },
    );
    assert_eq!(transitions(&fx), [("gw2".to_string(), BackendState::Down)]);
}

#[test]
fn a_service_a_member_cannot_run_is_refused_and_the_previous_one_stays() {
    let mut b = start_with(MemMaps::new(), None);
    b.snapshot(0, Some(service(5, SERVICE)), &[]);
    let before = b.maps().clone();
    // Revision 6 sends gw2 out of an interface this host does not have.
    let bad = SERVICE.replace(
        "address = \"10.0.0.12\"\n",
        "address = \"10.0.0.12\"\ninterface = \"eth7\"\n",
    );
    let fx = b.etcd(100, Update::Service(service(6, &bad)));
    let err = fx
        .iter()
        .find_map(|e| match e {
            Effect::Log(Log::ServiceRefused { revision: 6, error }) => Some(error.clone()),
            _ => None,
        })
        .expect("refused");
    assert!(err.contains("eth7"), "{err}");
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Hook(HookEvent::ServiceRefused { revision: 6, .. })
    )));
    let p = Bed::published(&fx).expect("published");
    assert_eq!(p.service_revision, 5);
    assert!(
        p.service_error.as_deref().unwrap().contains("revision 6"),
        "{p:?}"
    );
    assert_eq!(b.maps(), &before, "nothing half-applied");
    // A service document that is not one is refused too (with the etcd key as its origin).
    let fx = b.etcd(
        200,
        Update::Service(service(7, "[agent]\npin_dir = \"/x\"\n")),
    );
    let err = fx
        .iter()
        .find_map(|e| match e {
            Effect::Log(Log::ServiceRefused { error, .. }) => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        err.contains("etcd /vpnlb/edge/service (revision 7)"),
        "{err}"
    );
    assert!(err.contains("[[backend]] and [[vip]] only"), "{err}");
    // A good revision clears the error.
    let fx = b.etcd(300, Update::Service(service(8, SERVICE)));
    let p = Bed::published(&fx).expect("published");
    assert_eq!((p.service_revision, p.service_error.clone()), (8, None));
}

#[test]
fn admin_requests_go_through_etcd_and_apply_when_they_come_back() {
    let mut b = start_with(MemMaps::new(), None);
    b.snapshot(0, Some(service(5, SERVICE)), &[]);
    b.check(100, "gw1", true);
    b.check(100, "gw2", true);
    let fx = b.handle(
        200,
        Event::Admin {
            backend: "gw1".into(),
            admin: Admin::Drain,
        },
    );
    assert!(fx.iter().any(|e| matches!(e,
        Effect::Etcd(Command::SetAdmin { backend, value: Some(v) }) if backend == "gw1" && v == "drain")));
    assert!(transitions(&fx).is_empty(), "not before etcd has it");
    assert_eq!(b.core.health().state("gw1"), Some(BackendState::Up));
    // The watch brings it back (to every member): now it applies.
    let fx = b.etcd(
        210,
        Update::Admin {
            backend: "gw1".into(),
            value: Some("drain".into()),
        },
    );
    assert_eq!(
        transitions(&fx),
        [("gw1".to_string(), BackendState::Draining)]
    );
    assert_eq!(
        b.maps().backend(b.id("gw1")).unwrap().state,
        BACKEND_DRAINING
    );
    // etcd lost: admin requests are refused (they are cluster-wide), forwarding stays.
    b.etcd(
        300,
        Update::Lost {
            error: "connection refused".into(),
        },
    );
    let fx = b.handle(
        310,
        Event::Admin {
            backend: "gw1".into(),
            admin: Admin::None,
        },
    );
    let r = fx
        .iter()
        .find_map(|e| match e {
            Effect::Reply(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert!(
        r.error.as_deref().unwrap().contains("etcd is unreachable"),
        "{r:?}"
    );
    assert_eq!(
        b.maps().backend(b.id("gw1")).unwrap().state,
        BACKEND_DRAINING
    );
}

#[test]
fn etcd_loss_freezes_the_agreed_state_by_default() {
    let mut b = start_with(MemMaps::new(), None);
    b.snapshot(
        0,
        Some(service(5, SERVICE)),
        &[("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Up)])],
    );
    b.check(100, "gw1", true);
    b.check(100, "gw2", true);
    assert_eq!(b.ring().len(), 2);
    let fx = b.etcd(
        200,
        Update::Lost {
            error: "deadline exceeded".into(),
        },
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Log(Log::Etcd { up: false, .. })))
    );
    // This member's checks say gw2 is down: frozen, the maps keep forwarding as agreed.
    let fx = b.check(300, "gw2", false);
    assert!(transitions(&fx).is_empty());
    assert_eq!(b.ring().len(), 2);
    // etcd back (a new snapshot): the views count again; lb2 now sees gw2 down too: 2 of 2.
    b.snapshot(
        400,
        None,
        &[("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Down)])],
    );
    assert_eq!(b.core.health().state("gw2"), Some(BackendState::Down));
}

#[test]
fn with_on_etcd_loss_local_this_hosts_checks_decide() {
    let host = HOST.replace("peer_key_file", "on_etcd_loss = \"local\"\npeer_key_file");
    let t0 = Instant::now();
    let (core, fx) = Core::start(
        Recording::new(MemMaps::new()),
        Start {
            cfg: config::parse(&host, "host.toml").unwrap(),
            config_path: "/etc/vpnlb/vpnlb.toml".into(),
            saved_ids: None,
            saved_admin: BTreeMap::new(),
            ifaces: ifaces(),
            neighbours: HashMap::new(),
            host: "lb1".into(),
            pid: 7,
            cached_service: None,
        },
        t0,
        SystemTime::UNIX_EPOCH,
    )
    .unwrap();
    let mut b = Bed { core, t0, fx };
    b.snapshot(
        0,
        Some(service(5, SERVICE)),
        &[
            ("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Up)]),
            ("lb3", &[("gw1", Seen::Up), ("gw2", Seen::Up)]),
        ],
    );
    b.check(100, "gw1", true);
    b.check(100, "gw2", true);
    b.check(200, "gw2", false);
    assert_eq!(b.ring().len(), 2, "1 of 3: still in");
    let fx = b.etcd(
        300,
        Update::Lost {
            error: "gone".into(),
        },
    );
    assert_eq!(transitions(&fx), [("gw2".to_string(), BackendState::Down)]);
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw1")]));
}

#[test]
fn rings_that_differ_from_a_peer_that_should_have_the_same_raise_an_alarm() {
    let mut b = start_with(MemMaps::new(), None);
    b.snapshot(0, Some(service(5, SERVICE)), &[]);
    b.check(100, "gw1", true);
    let fx = b.check(100, "gw2", true);
    let own = Bed::published(&fx).cloned().expect("published");
    // A peer with the same revision and the same agreed health, and the same rings: fine.
    let same = MemberState {
        member: "lb2".into(),
        ..own.clone()
    };
    let fx = b.etcd(
        200,
        Update::Member {
            name: "lb2".into(),
            state: Some(same.clone()),
        },
    );
    assert!(
        fx.iter()
            .all(|e| !matches!(e, Effect::Log(Log::RingMismatch { .. })))
    );
    // Its ring hash differs: alarm (log, hook, status).
    let mut other = same.clone();
    other.rings.insert("wg".into(), "0000000000000000".into());
    let fx = b.etcd(
        300,
        Update::Member {
            name: "lb2".into(),
            state: Some(other.clone()),
        },
    );
    assert!(fx.iter().any(|e| matches!(e,
        Effect::Log(Log::RingMismatch { rings }) if rings == &["wg@lb2".to_string()])));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Hook(HookEvent::RingMismatch { .. })))
    );
    let fx = b.handle(310, Event::Status);
    let st = fx
        .iter()
        .find_map(|e| match e {
            Effect::Reply(r) => Some(r.result.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        st["cluster"]["ring_mismatch"],
        serde_json::json!(["wg@lb2"])
    );
    // A peer on another revision is not compared (it is expected to differ).
    let mut older = other;
    older.service_revision = 4;
    b.etcd(
        400,
        Update::Member {
            name: "lb2".into(),
            state: Some(older),
        },
    );
    let fx = b.handle(410, Event::Status);
    let st = fx
        .iter()
        .find_map(|e| match e {
            Effect::Reply(r) => Some(r.result.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(st["cluster"]["ring_mismatch"], serde_json::json!([]));
}

#[test]
fn a_restart_without_etcd_runs_the_cached_service_and_adopts_the_pins() {
    let pins = pinned();
    let b = start_with(pins.clone(), Some(service(5, SERVICE)));
    assert_eq!(b.maps().backends, pins.backends, "no backend changed");
    assert_eq!(b.maps().rings, pins.rings, "no ring changed");
    assert_eq!(b.core.health().state("gw1"), Some(BackendState::Up));
    let _: Backend = b.maps().backend(b.id("gw1")).unwrap();
    let _ = addr_words;
}

#[test]
fn the_published_role_goes_waiting_checking_syncing_ready_and_carries_the_lag() {
    use crate::cluster::Role;
    use crate::cluster::replicate::Report;
    let mut b = start_with(MemMaps::new(), None);
    let lb2 = MemberState {
        ready: true,
        role: Role::Ready,
        ..peer("lb2", &[("gw1", Seen::Up), ("gw2", Seen::Up)])
    };
    b.etcd(
        0,
        Update::Snapshot(Snapshot {
            revision: 10,
            members: BTreeMap::from([("lb2".to_string(), lb2)]),
            ..Default::default()
        }),
    );
    let last = |b: &Bed| {
        let m = b.core.member.as_ref().and_then(|m| m.published.as_ref());
        m.map(|m| (m.role, m.ready))
    };
    assert_eq!(last(&b), Some((Role::Waiting, false)));
    let role = |fx: &[Effect]| Bed::published(fx).map(|m| (m.role, m.ready));
    let fx = b.etcd(100, Update::Service(service(5, SERVICE)));
    assert_eq!(role(&fx), Some((Role::Checking, false)));
    b.check(200, "gw1", true);
    let fx = b.check(200, "gw2", true);
    // A ready peer's sessions are not here yet.
    assert_eq!(role(&fx), Some((Role::Syncing, false)));
    let fx = b.handle(
        350,
        Event::Replication(Report::Synced { peer: "lb2".into() }),
    );
    assert_eq!(role(&fx), Some((Role::Ready, true)));
    // The lag the shell reports is published once, then only when it changes.
    let lag = Report::Lag {
        p50_ms: 0.6,
        p99_ms: 0.9,
    };
    let fx = b.handle(400, Event::Replication(lag.clone()));
    let m = Bed::published(&fx).expect("published with the lag");
    assert_eq!(
        (m.replication_lag_ms_p50, m.replication_lag_ms_p99),
        (Some(0.6), Some(0.9))
    );
    let fx = b.handle(500, Event::Replication(lag));
    assert!(Bed::published(&fx).is_none(), "nothing changed: no write");
}
