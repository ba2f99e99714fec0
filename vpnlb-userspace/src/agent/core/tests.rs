//! The agent core on in-memory maps with a fake clock: start and adoption, check results and
//! their generations, neighbour reports, admin requests, pool failover and its hooks, reload
//! diffs, status. No root, no sockets, no sleeping: time is an argument.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use vpnlb_common::{
    BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP, Backend, addr_words,
};

use super::*;
use crate::agent::hooks::HookEvent;
use crate::dataplane::maps::{MemMaps, Recording};

const ETH0: Iface = Iface {
    ifindex: 2,
    mac: [2, 0, 0, 0, 0, 1],
};
const GW1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const GW2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x12];

/// gw1 (configured MAC, icmp), gw2 (MAC from the neighbour table, icmp + tcp), gw3 (configured
/// MAC, tcp with rise/fall 2) in pool `primary`; gw4 (configured MAC, icmp) in pool `standby`.
const CONFIG: &str = r#"
[agent]
pin_dir = "/sys/fs/bpf/vpnlb-test"
control_socket = "/run/vpnlb-test/control.sock"

[[interface]]
name = "eth0"

[[backend]]
name = "gw1"
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
[[backend.check]]
type = "icmp"

[[backend]]
name = "gw2"
address = "10.0.0.12"
[[backend.check]]
type = "icmp"
[[backend.check]]
type = "tcp"
port = 443

[[backend]]
name = "gw3"
address = "10.0.0.13"
mac = "02:00:00:00:00:13"
[[backend.check]]
type = "tcp"
port = 443
rise = 2
fall = 2

[[backend]]
name = "gw4"
address = "10.0.0.14"
mac = "02:00:00:00:00:14"
[[backend.check]]
type = "icmp"

[[vip]]
name = "wg"
address = "203.0.113.10"
port = 51820
protocol = "udp"
ring_size = 251

[[vip.pool]]
name = "primary"
priority = 100
backends = ["gw1", "gw2", "gw3"]

[[vip.pool]]
name = "standby"
priority = 10
backends = ["gw4"]
"#;

fn cfg(text: &str) -> Config {
    config::parse(text, "test.toml").expect("test config parses")
}

fn ifaces() -> HashMap<String, Iface> {
    HashMap::from([("eth0".to_string(), ETH0)])
}

/// The fake clock: `at(ms)` is `ms` milliseconds after the test's origin.
struct Clock {
    t0: Instant,
}

impl Clock {
    fn at(&self, ms: u64) -> (Instant, SystemTime) {
        (
            self.t0 + Duration::from_millis(ms),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms),
        )
    }
}

type TestCore = Core<Recording<MemMaps>>;

struct Bed {
    core: TestCore,
    clock: Clock,
    /// Effects of the start, then of every event, in order.
    fx: Vec<Effect>,
}

fn start_on(maps: MemMaps, cfg: Config, neighbours: HashMap<NeighKey, [u8; 6]>) -> Bed {
    let clock = Clock { t0: Instant::now() };
    let (now, wall) = clock.at(0);
    let (core, fx) = Core::start(
        Recording::new(maps),
        Start {
            cfg,
            config_path: "/etc/vpnlb/test.toml".into(),
            saved_ids: None,
            saved_admin: BTreeMap::new(),
            ifaces: ifaces(),
            neighbours,
            host: "lb1".into(),
            pid: 4242,
            cached_service: None,
        },
        now,
        wall,
    )
    .expect("start");
    Bed { core, clock, fx }
}

fn gw2_key() -> NeighKey {
    ("eth0".to_string(), "10.0.0.12".parse().unwrap())
}

fn start() -> Bed {
    start_on(
        MemMaps::new(),
        cfg(CONFIG),
        HashMap::from([(gw2_key(), GW2_MAC)]),
    )
}

impl Bed {
    fn handle(&mut self, ms: u64, ev: Event) -> Vec<Effect> {
        let (now, wall) = self.clock.at(ms);
        self.core.handle(now, wall, ev)
    }

    /// The generation of the checks the core last started for `backend`.
    fn check_gen(&self, backend: &str, fx: &[Effect]) -> u64 {
        fx.iter()
            .rev()
            .find_map(|e| match e {
                Effect::StartChecks { backend: b, checks } if b == backend => {
                    Some(checks[0].1.generation)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no StartChecks for {backend}"))
    }

    fn neigh_gen(&self, backend: &str, fx: &[Effect]) -> Option<u64> {
        fx.iter().rev().find_map(|e| match e {
            Effect::WatchNeigh {
                backend: b,
                generation,
                ..
            } if b == backend => Some(*generation),
            _ => None,
        })
    }

    fn id(&self, backend: &str) -> u32 {
        self.core.ids().backend(backend).unwrap()
    }

    fn result(&self, backend: &str, idx: usize, generation: u64, ok: bool, ms: u64) -> Event {
        Event::Check(CheckResult {
            backend_id: self.id(backend),
            check_index: idx,
            generation,
            ok,
            latency: ok.then(|| Duration::from_micros(300)),
            phases: Vec::new(),
            detail: if ok { "ok".into() } else { "timeout".into() },
            at: self.clock.at(ms).0,
        })
    }

    /// Every configured check of every backend reports `ok`, each once, at `ms`.
    fn all_checks(&mut self, ok: bool, ms: u64) -> Vec<Effect> {
        let start = std::mem::take(&mut self.fx);
        let mut out = Vec::new();
        for name in ["gw1", "gw2", "gw3", "gw4"] {
            let g = self.check_gen(name, &start);
            let n = self.core.config().backend(name).unwrap().checks.len();
            for i in 0..n {
                let ev = self.result(name, i, g, ok, ms);
                out.extend(self.handle(ms, ev));
            }
        }
        self.fx = start;
        out
    }

    fn maps(&self) -> &MemMaps {
        &self.core.dataplane().writer().inner
    }

    fn state(&self, backend: &str) -> BackendState {
        self.core.health().state(backend).unwrap()
    }

    /// Backend ids in the VIP's ring.
    fn ring(&self) -> BTreeSet<u32> {
        let meta = self.maps().vips.values().next().expect("vip written");
        self.maps()
            .ring(meta.ring_id, meta.ring_size)
            .unwrap()
            .into_iter()
            .collect()
    }
}

fn transitions(fx: &[Effect]) -> Vec<(String, BackendState, BackendState)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Log(Log::Transition { t, .. }) => Some((t.backend.clone(), t.from, t.to)),
            _ => None,
        })
        .collect()
}

fn reply(fx: &[Effect]) -> &Response {
    fx.iter()
        .find_map(|e| match e {
            Effect::Reply(r) => Some(r),
            _ => None,
        })
        .expect("a reply")
}

fn hooks(fx: &[Effect]) -> Vec<&HookEvent> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Hook(h) => Some(h),
            _ => None,
        })
        .collect()
}

#[test]
fn start_writes_every_backend_down_and_asks_for_links_checks_and_files() {
    let b = start();
    let kinds: Vec<&str> =
        b.fx.iter()
            .map(|e| match e {
                Effect::StartChecks { .. } => "start_checks",
                Effect::WatchNeigh { .. } => "watch_neigh",
                Effect::Attach { .. } => "attach",
                Effect::PersistIds(_) => "persist_ids",
                Effect::MapsApplied { .. } => "maps",
                Effect::PublishView(_) => "view",
                _ => "other",
            })
            .collect();
    // Maps written before the link is attached; then the checks.
    let pos = |k: &str| kinds.iter().position(|x| *x == k).unwrap();
    assert!(pos("maps") < pos("attach"), "{kinds:?}");
    assert!(pos("attach") < pos("start_checks"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "start_checks").count(), 4);
    // Only gw2 (no configured MAC) is watched in the neighbour table; its MAC came from the
    // table already.
    assert_eq!(kinds.iter().filter(|k| **k == "watch_neigh").count(), 1);
    assert_eq!(b.core.learned_mac("gw2"), Some(GW2_MAC));
    // No check has concluded: every backend is written, down, and the ring is empty.
    for n in ["gw1", "gw2", "gw3", "gw4"] {
        assert_eq!(b.state(n), BackendState::Unknown);
        assert_eq!(b.maps().backend(b.id(n)).unwrap().state, BACKEND_DOWN);
    }
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().mac, GW2_MAC);
    assert_eq!(b.ring(), BTreeSet::from([0]));
    // The link: interface eth0 in its configured mode.
    assert!(b.fx.iter().any(|e| matches!(e,
        Effect::Attach { iface, mode: AttachMode::Native } if iface == "eth0")));
}

#[test]
fn results_bring_backends_up_then_a_failure_takes_one_out_of_the_ring() {
    let mut b = start();
    let fx = b.all_checks(true, 100);
    assert_eq!(
        transitions(&fx),
        ["gw1", "gw2", "gw3", "gw4"].map(|n| (
            n.to_string(),
            BackendState::Unknown,
            BackendState::Up
        ))
    );
    // First conclusions after start are part of a normal start (logged as such), and one summary
    // line says every backend concluded.
    assert!(
        fx.iter()
            .all(|e| !matches!(e, Effect::Log(Log::Transition { initial: false, .. })))
    );
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Log(Log::Settled {
            up: 4,
            down: 0,
            other: 0,
            ..
        })
    )));
    assert_eq!(
        b.ring(),
        BTreeSet::from([b.id("gw1"), b.id("gw2"), b.id("gw3")])
    );
    // gw1's icmp fails (fall 3 by default): down after the third failure only.
    let g1 = b.check_gen("gw1", &b.fx);
    for ms in [200, 300] {
        let ev = b.result("gw1", 0, g1, false, ms);
        assert!(transitions(&b.handle(ms, ev)).is_empty());
    }
    let ev = b.result("gw1", 0, g1, false, 400);
    let fx = b.handle(400, ev);
    assert_eq!(
        transitions(&fx),
        [("gw1".to_string(), BackendState::Up, BackendState::Down)]
    );
    assert!(matches!(
        fx.iter().find_map(|e| match e {
            Effect::Log(Log::Transition { initial, .. }) => Some(*initial),
            _ => None,
        }),
        Some(false)
    ));
    let hook = hooks(&fx);
    assert_eq!(hook.len(), 1);
    let HookEvent::BackendState {
        host, transition, ..
    } = hook[0]
    else {
        panic!("{hook:?}")
    };
    assert_eq!((host.as_str(), transition.backend.as_str()), ("lb1", "gw1"));
    assert_eq!(
        transition.at_wall,
        b.clock.at(400).1,
        "wall clock is the input"
    );
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw2"), b.id("gw3")]));
    assert_eq!(b.maps().backend(b.id("gw1")).unwrap().state, BACKEND_DOWN);
}

#[test]
fn a_result_of_a_replaced_generation_is_ignored() {
    let mut b = start();
    b.all_checks(true, 100);
    let old = b.check_gen("gw3", &b.fx);
    // Reload gw3 with another check list: its checks restart under a new generation.
    let text = CONFIG.replace(
        "type = \"tcp\"\nport = 443\nrise = 2\nfall = 2",
        "type = \"tcp\"\nport = 8443\nrise = 2\nfall = 1",
    );
    let fx = b.handle(200, Event::reload(Ok(cfg(&text)), ifaces()));
    assert!(reply(&fx).ok, "{:?}", reply(&fx));
    let new = b.check_gen("gw3", &fx);
    assert_ne!(old, new);
    assert_eq!(b.state("gw3"), BackendState::Up, "carried over");
    // A failure of the old tcp:443 check, queued before the reload: with fall = 1 it would take
    // gw3 down if it counted.
    let ev = b.result("gw3", 0, old, false, 250);
    assert!(transitions(&b.handle(250, ev)).is_empty());
    assert_eq!(b.state("gw3"), BackendState::Up);
    // The new check's failure counts.
    let ev = b.result("gw3", 0, new, false, 300);
    assert_eq!(
        transitions(&b.handle(300, ev)),
        [("gw3".to_string(), BackendState::Up, BackendState::Down)]
    );
}

/// The latent bug of the old agent loop: a neighbour report queued before a reload that gives
/// the backend a MAC was fed into its last check (`checks.len() - 1`), now a real check, and
/// took it down. The report carries its watch's generation; the reload ended that watch.
#[test]
fn a_neighbour_report_queued_before_a_reload_that_gives_a_mac_is_ignored() {
    let mut b = start();
    b.all_checks(true, 100);
    let watch = b.neigh_gen("gw2", &b.fx).expect("gw2 is watched");
    let text = CONFIG.replace(
        "name = \"gw2\"\naddress = \"10.0.0.12\"\n",
        "name = \"gw2\"\naddress = \"10.0.0.12\"\nmac = \"02:00:00:00:00:12\"\n",
    );
    let fx = b.handle(200, Event::reload(Ok(cfg(&text)), ifaces()));
    assert!(reply(&fx).ok, "{:?}", reply(&fx));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::UnwatchNeigh { backend } if backend == "gw2"))
    );
    assert!(b.neigh_gen("gw2", &fx).is_none(), "no watch with a MAC");
    let g = b.check_gen("gw2", &fx);
    // gw2's new checks: icmp (fall 3), tcp (fall 3); they come up.
    for i in 0..2 {
        let ev = b.result("gw2", i, g, true, 300);
        b.handle(300, ev);
    }
    assert_eq!(b.state("gw2"), BackendState::Up);
    // The stale report: "no neighbour entry" from the watch the reload ended.
    let fx = b.handle(
        400,
        Event::Neigh(NeighUpdate {
            backend: "gw2".into(),
            generation: watch,
            mac: None,
            detail: "no neighbour entry for 10.0.0.12 on eth0".into(),
        }),
    );
    assert!(transitions(&fx).is_empty(), "{:?}", transitions(&fx));
    assert_eq!(b.state("gw2"), BackendState::Up);
    let tcp = &b.core.health().backends["gw2"].checks[1];
    assert_eq!((tcp.results, tcp.failures), (1, 0), "nothing fed into tcp");
}

#[test]
fn neighbour_reports_update_the_mac_and_a_vanished_entry_keeps_the_known_one() {
    // gw2's MAC is not in the table at start: it cannot serve until the watcher finds it.
    let mut b = start_on(MemMaps::new(), cfg(CONFIG), HashMap::new());
    let watch = b.neigh_gen("gw2", &b.fx).unwrap();
    b.all_checks(true, 100);
    assert_eq!(b.state("gw2"), BackendState::Unknown, "no MAC yet");
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().mac, [0; 6]);
    let neigh = |mac: Option<[u8; 6]>| {
        Event::Neigh(NeighUpdate {
            backend: "gw2".into(),
            generation: watch,
            mac,
            detail: "report".into(),
        })
    };
    let fx = b.handle(200, neigh(Some(GW2_MAC)));
    assert_eq!(
        transitions(&fx),
        [("gw2".to_string(), BackendState::Unknown, BackendState::Up)]
    );
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().mac, GW2_MAC);
    assert!(b.ring().contains(&b.id("gw2")));
    // The entry ages out of the neighbour table: the MAC stays, gw2 keeps serving.
    let fx = b.handle(300, neigh(None));
    assert!(transitions(&fx).is_empty());
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Log(Log::NeighKept { .. })))
    );
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().mac, GW2_MAC);
    // The gateway's MAC changes: the map follows without a state change.
    let moved = [2, 0, 0, 0, 0, 0x99];
    let fx = b.handle(400, neigh(Some(moved)));
    assert!(transitions(&fx).is_empty());
    assert_eq!(b.maps().backend(b.id("gw2")).unwrap().mac, moved);
    // A check result addressed to the neighbour pseudo-check's index is not taken.
    let g = b.check_gen("gw2", &b.fx);
    let ev = b.result("gw2", 2, g, false, 500);
    assert!(transitions(&b.handle(500, ev)).is_empty());
}

/// A restart over pinned maps: every backend the previous agent served keeps serving with the
/// same entry (the MAC of gw2 from the pinned map while the neighbour table is still empty), so
/// the restart changes no backend state and moves no flow.
#[test]
fn a_restart_adopts_pinned_states_and_macs_and_changes_nothing() {
    let mut first = start();
    first.all_checks(true, 100);
    let before = first.maps().clone();
    let pinned = first.core.dataplane().writer().inner.clone();
    let ids = first.core.ids().clone();
    let clock = Clock { t0: Instant::now() };
    let (now, wall) = clock.at(0);
    let (core, fx) = Core::start(
        Recording::new(pinned),
        Start {
            cfg: cfg(CONFIG),
            config_path: "/etc/vpnlb/test.toml".into(),
            saved_ids: Some(ids),
            saved_admin: BTreeMap::new(),
            ifaces: ifaces(),
            neighbours: HashMap::new(),
            host: "lb1".into(),
            pid: 4243,
            cached_service: None,
        },
        now,
        wall,
    )
    .unwrap();
    assert!(transitions(&fx).is_empty());
    for n in ["gw1", "gw2", "gw3", "gw4"] {
        assert_eq!(core.health().state(n), Some(BackendState::Up), "{n}");
    }
    assert_eq!(core.learned_mac("gw2"), Some(GW2_MAC));
    let after = &core.dataplane().writer().inner;
    assert_eq!(after.backends, before.backends, "no backend entry changed");
    assert_eq!(after.rings, before.rings, "no ring slot changed");
    assert_eq!(after.vips, before.vips);
    // A pinned entry of another gateway under the same id is not adopted.
    let mut other = before.clone();
    let id = first.id("gw3");
    other.backends[id as usize].addr = addr_words("10.9.9.9".parse().unwrap()).0;
    let mut b = start_on(other, cfg(CONFIG), HashMap::from([(gw2_key(), GW2_MAC)]));
    assert_eq!(b.state("gw3"), BackendState::Unknown);
    assert_eq!(b.state("gw1"), BackendState::Up);
    b.fx.clear();
}

#[test]
fn a_restart_prunes_what_the_config_no_longer_has() {
    let mut first = start();
    first.all_checks(true, 100);
    let pinned = first.maps().clone();
    let text = CONFIG.replace("backends = [\"gw4\"]", "backends = [\"gw1\"]");
    let text = text.replace(
        "[[backend]]\nname = \"gw4\"\naddress = \"10.0.0.14\"\nmac = \"02:00:00:00:00:14\"\n[[backend.check]]\ntype = \"icmp\"\n",
        "",
    );
    let b = start_on(pinned, cfg(&text), HashMap::from([(gw2_key(), GW2_MAC)]));
    assert!(
        b.fx.iter().any(|e| matches!(
            e,
            Effect::Log(Log::Pruned {
                vips: 0,
                backends: 1
            })
        )) || b.maps().backend(first.id("gw4")).unwrap().state == BACKEND_UNUSED,
    );
    assert_eq!(
        b.maps().backend(first.id("gw4")).unwrap().state,
        BACKEND_UNUSED
    );
}

#[test]
fn admin_drain_and_disable_are_replied_persisted_and_applied() {
    let mut b = start();
    b.all_checks(true, 100);
    let fx = b.handle(
        200,
        Event::Admin {
            backend: "gw1".into(),
            admin: Admin::Drain,
        },
    );
    let r = reply(&fx);
    assert!(r.ok);
    assert_eq!(r.result["state"], "draining");
    assert_eq!(r.result["changed"], true);
    assert!(fx.iter().any(|e| matches!(e, Effect::PersistAdmin(a)
        if a == &BTreeMap::from([("gw1".to_string(), Admin::Drain)]))));
    assert_eq!(
        b.maps().backend(b.id("gw1")).unwrap().state,
        BACKEND_DRAINING
    );
    assert!(!b.ring().contains(&b.id("gw1")));
    // Again: no change, still answered.
    let fx = b.handle(
        210,
        Event::Admin {
            backend: "gw1".into(),
            admin: Admin::Drain,
        },
    );
    assert_eq!(reply(&fx).result["changed"], false);
    assert!(transitions(&fx).is_empty());
    // Undrain: back in the ring, nothing left to persist.
    let fx = b.handle(
        220,
        Event::Admin {
            backend: "gw1".into(),
            admin: Admin::None,
        },
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::PersistAdmin(a) if a.is_empty()))
    );
    assert!(b.ring().contains(&b.id("gw1")));
    let fx = b.handle(
        230,
        Event::Admin {
            backend: "nope".into(),
            admin: Admin::Disable,
        },
    );
    assert_eq!(
        reply(&fx).error.as_deref(),
        Some("unknown backend \"nope\"")
    );
}

#[test]
fn a_failed_map_write_is_reported_to_the_admin_and_retried_on_the_next_event() {
    let mut b = start();
    b.all_checks(true, 100);
    let w = b.core.dp.writer_mut();
    w.fail_at = Some(w.log.len());
    let fx = b.handle(
        200,
        Event::Admin {
            backend: "gw1".into(),
            admin: Admin::Disable,
        },
    );
    let r = reply(&fx);
    assert!(!r.ok);
    assert!(
        r.error.as_deref().unwrap().starts_with("maps not updated"),
        "{r:?}"
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Log(Log::ApplyFailed { why: "admin", .. })))
    );
    // A result that changes nothing does not retry (a persistent failure would log at the rate
    // of the checks); the next tick does and writes what was missed.
    b.core.dp.writer_mut().fail_at = None;
    let g = b.check_gen("gw4", &b.fx);
    let ev = b.result("gw4", 0, g, true, 300);
    b.handle(300, ev);
    assert_eq!(b.maps().backend(b.id("gw1")).unwrap().state, BACKEND_UP);
    b.handle(1_000, Event::Tick);
    assert_eq!(b.maps().backend(b.id("gw1")).unwrap().state, BACKEND_DOWN);
    assert!(!b.ring().contains(&b.id("gw1")));
}

#[test]
fn the_standby_pool_takes_over_with_a_hook_and_hands_back() {
    let mut b = start();
    let fx = b.all_checks(true, 100);
    // The first serving pool after start is logged as such.
    assert!(fx.iter().any(|e| matches!(e,
        Effect::Log(Log::Pool { initial: true, to: Some(p), .. }) if p == "primary")));
    for (n, ms) in [("gw1", 200), ("gw2", 210), ("gw3", 220)] {
        b.handle(
            ms,
            Event::Admin {
                backend: n.into(),
                admin: Admin::Disable,
            },
        );
    }
    assert_eq!(b.core.choices()[0].pool.as_deref(), Some("standby"));
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw4")]));
    // The failover was reported when the last primary member left.
    let fx = b.handle(
        300,
        Event::Admin {
            backend: "gw2".into(),
            admin: Admin::None,
        },
    );
    let pool_logs: Vec<_> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Log(Log::Pool {
                from, to, initial, ..
            }) => Some((from.clone(), to.clone(), *initial)),
            _ => None,
        })
        .collect();
    assert_eq!(
        pool_logs,
        [(Some("standby".into()), Some("primary".into()), false)]
    );
    let failovers: Vec<_> = hooks(&fx)
        .into_iter()
        .filter_map(|h| match h {
            HookEvent::Failover {
                from_pool,
                to_pool,
                at,
                ..
            } => Some((from_pool.clone(), to_pool.clone(), *at)),
            _ => None,
        })
        .collect();
    assert_eq!(failovers.len(), 1);
    assert_eq!(failovers[0].0.as_deref(), Some("standby"));
    assert_eq!(failovers[0].1.as_deref(), Some("primary"));
    assert_eq!(failovers[0].2, 1_800_000_000.3, "the wall clock given");
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw2")]));
}

#[test]
fn reload_restarts_only_changed_backends_and_carries_a_healthy_state_over() {
    let mut b = start();
    b.all_checks(true, 100);
    b.handle(
        150,
        Event::Admin {
            backend: "gw3".into(),
            admin: Admin::Drain,
        },
    );
    let gen_before: BTreeMap<&str, u64> = ["gw1", "gw3", "gw4"]
        .into_iter()
        .map(|n| (n, b.check_gen(n, &b.fx)))
        .collect();
    // gw1: unchanged. gw2: removed. gw3: other checks (same gateway). gw4: other address.
    let text = CONFIG
        .replace(
            "[[backend]]\nname = \"gw2\"\naddress = \"10.0.0.12\"\n[[backend.check]]\ntype = \"icmp\"\n[[backend.check]]\ntype = \"tcp\"\nport = 443\n",
            "",
        )
        .replace("backends = [\"gw1\", \"gw2\", \"gw3\"]", "backends = [\"gw1\", \"gw3\"]")
        .replace("port = 443\nrise = 2\nfall = 2", "port = 8443\nrise = 2\nfall = 2")
        .replace("address = \"10.0.0.14\"", "address = \"10.0.0.24\"");
    let gw2 = b.id("gw2");
    let fx = b.handle(200, Event::reload(Ok(cfg(&text)), ifaces()));
    let r = reply(&fx);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        r.result["restarted_checks"],
        serde_json::json!(["gw3", "gw4"])
    );
    assert_eq!(r.result["removed_backends"], serde_json::json!(["gw2"]));
    let started: Vec<&str> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::StartChecks { backend, .. } => Some(backend.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(started, ["gw3", "gw4"]);
    let stopped: Vec<&str> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::StopChecks { backend } => Some(backend.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stopped, ["gw3", "gw4", "gw2"]);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::UnwatchNeigh { backend } if backend == "gw2"))
    );
    // Each restarted backend's stop comes before its start.
    let pos = |want: &dyn Fn(&Effect) -> bool| fx.iter().position(want).unwrap();
    assert!(
        pos(&|e| matches!(e, Effect::StopChecks { backend } if backend == "gw3"))
            < pos(&|e| matches!(e, Effect::StartChecks { backend, .. } if backend == "gw3"))
    );
    // gw1 unchanged: same generation, still up. gw3: same gateway, still draining (admin kept,
    // health carried over). gw4: another address, starts from scratch.
    assert_eq!(b.state("gw1"), BackendState::Up);
    assert_eq!(b.state("gw3"), BackendState::Draining);
    assert_eq!(b.state("gw4"), BackendState::Unknown);
    assert_ne!(b.check_gen("gw3", &fx), gen_before["gw3"]);
    // gw2 is gone from the maps; gw1 alone in the ring (gw3 drains).
    assert_eq!(b.maps().backend(gw2).unwrap().state, BACKEND_UNUSED);
    assert_eq!(b.ring(), BTreeSet::from([b.id("gw1")]));
    assert!(!b.core.health().backends.contains_key("gw2"));
    // A late result of gw2's checks finds nothing to count for.
    let ev = Event::Check(CheckResult {
        backend_id: gw2,
        check_index: 0,
        generation: 2,
        ok: false,
        latency: None,
        phases: Vec::new(),
        detail: "late".into(),
        at: b.clock.at(250).0,
    });
    assert!(
        b.handle(250, ev)
            .iter()
            .all(|e| !matches!(e, Effect::Log(_)))
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Log(Log::Reloaded { .. })))
    );
    assert!(fx.iter().any(|e| matches!(e, Effect::PersistIds(_))));
}

#[test]
fn a_rejected_reload_changes_nothing_and_says_why() {
    let mut b = start();
    b.all_checks(true, 100);
    let maps = b.maps().clone();
    type Case = (
        Result<Config, ConfigError>,
        HashMap<String, Iface>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            config::parse("[[backend]]\nname = 1\n", "broken.toml"),
            ifaces(),
            "broken.toml",
        ),
        (
            Ok(cfg(&CONFIG.replace(
                "vpnlb-test\"\ncontrol",
                "vpnlb-other\"\ncontrol",
            ))),
            ifaces(),
            "pin_dir and max_sessions cannot change on reload",
        ),
        (
            Ok(cfg(&CONFIG.replace("name = \"eth0\"", "name = \"eth9\""))),
            ifaces(),
            "no interface named \"eth9\"",
        ),
    ];
    for (i, (c, ifs, want)) in cases.into_iter().enumerate() {
        let fx = b.handle(200 + i as u64, Event::reload(c, ifs));
        let r = reply(&fx);
        assert!(!r.ok);
        assert!(r.error.as_deref().unwrap().contains(want), "{r:?}");
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Log(Log::ReloadRejected { .. })))
        );
        assert!(
            fx.iter()
                .all(|e| !matches!(e, Effect::StartChecks { .. } | Effect::StopChecks { .. })),
            "nothing restarted"
        );
        assert_eq!(b.maps(), &maps, "no map written");
        assert_eq!(b.core.config(), &cfg(CONFIG));
    }
}

#[test]
fn status_ages_come_from_the_clock_given() {
    let mut b = start();
    b.all_checks(true, 100);
    let fx = b.handle(2_600, Event::Status);
    let s = &reply(&fx).result;
    let gw1 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "gw1")
        .unwrap();
    assert_eq!(gw1["state"], "up");
    assert_eq!(gw1["since_s"], 2.5);
    assert_eq!(gw1["checks"][0]["last_age_s"], 2.5);
    assert_eq!(s["agent"]["pid"], 4242);
    assert_eq!(s["agent"]["started"], 1_800_000_000.0);
    let gw2 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "gw2")
        .unwrap();
    let labels: Vec<&str> = gw2["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["icmp", "tcp:443", NEIGH_CHECK]);
}

#[test]
fn the_tick_publishes_the_view_only_after_unreported_results() {
    let mut b = start();
    b.all_checks(true, 100);
    let view = |fx: &[Effect]| fx.iter().any(|e| matches!(e, Effect::PublishView(_)));
    assert!(!view(&b.handle(1_000, Event::Tick)));
    // A result that changes no state marks the view stale; the next tick publishes it.
    let g = b.check_gen("gw1", &b.fx);
    let ev = b.result("gw1", 0, g, true, 1_100);
    assert!(!view(&b.handle(1_100, ev)));
    assert!(view(&b.handle(2_000, Event::Tick)));
    assert!(!view(&b.handle(3_000, Event::Tick)));
}

#[test]
fn an_attach_failure_is_logged_and_shown_in_status() {
    let mut b = start();
    let fx = b.handle(
        100,
        Event::AttachFailed {
            iface: "eth0".into(),
            error: "driver refused".into(),
        },
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Log(Log::AttachFailed { .. })))
    );
    let fx = b.handle(200, Event::Status);
    assert_eq!(
        reply(&fx).result["agent"]["attach_errors"]["eth0"],
        "driver refused"
    );
}

#[test]
fn backends_without_checks_serve_at_once() {
    let text = "[[interface]]\nname = \"eth0\"\n[[backend]]\nname = \"a\"\naddress = \"10.0.0.11\"\nmac = \"02:00:00:00:00:11\"\n[[vip]]\nname = \"v\"\naddress = \"203.0.113.1\"\nport = 1\nprotocol = \"udp\"\nring_size = 251\n[[vip.pool]]\nname = \"p\"\nbackends = [\"a\"]\n";
    let b = start_on(MemMaps::new(), cfg(text), HashMap::new());
    assert_eq!(b.state("a"), BackendState::Up);
    assert_eq!(b.maps().backend(b.id("a")).unwrap().state, BACKEND_UP);
    assert_eq!(b.ring(), BTreeSet::from([b.id("a")]));
    assert_eq!(b.maps().backend(b.id("a")).unwrap().mac, GW1_MAC);
    let _: Backend = b.maps().backend(b.id("a")).unwrap();
}
