//! The reconciler (pure): turns desired state (the resolved config) and backend health into
//! `Dataplane` calls. Pools give active-standby: a VIP's ring is built from the highest-priority pool
//! that has a healthy member; classes get their own ring with another pool order. The `Dataplane`
//! writes only Maglev deltas, in make-before-break order, so calling [`reconcile`] after any event is
//! cheap when little changed.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;
use vpnlb_common::VipKey;

use crate::agent::state::{BackendState, Health};
use crate::dataplane::maps::MapWriter;
use crate::dataplane::session_ids::IdPrefix;
use crate::dataplane::{ApplyReport, BackendSpec, ClassSpec, Dataplane, DataplaneError, VipSpec};

/// A backend with everything resolved (addresses, MACs, ifindexes) except its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub name: String,
    pub spec: BackendSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPool {
    pub name: String,
    /// Higher serves first.
    pub priority: i64,
    pub backends: Vec<String>,
}

/// A traffic class: its own ring, filled from `pool_order` (first pool with a healthy member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredClass {
    pub name: String,
    pub dscp: Vec<u8>,
    pub ring_id: u32,
    pub pool_order: Vec<String>,
}

/// A VIP with its data-plane identity; `template.backends` is filled by the reconciler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    pub template: VipSpec,
    pub pools: Vec<DesiredPool>,
    pub classes: Vec<DesiredClass>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub backends: Vec<DesiredBackend>,
    pub vips: Vec<DesiredVip>,
    /// Static session-id ranges (`ID_RANGES` prefix -> backend id) from the backends' config.
    pub id_ranges: Vec<(IdPrefix, u32)>,
}

/// Which pool serves a VIP (or one of its classes) right now, for status and events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolChoice {
    pub vip: String,
    /// None for the VIP's default order.
    pub class: Option<String>,
    /// None when no pool has a healthy member (new flows are dropped, counted).
    pub pool: Option<String>,
    /// The serving pool is not the first of the order (a pool failover is in effect).
    pub standby: bool,
}

/// The pool that serves `order` (pool names, in preference order): the first with a member that
/// takes new flows.
pub fn active_pool<'a>(order: &[&'a DesiredPool], health: &Health) -> Option<&'a DesiredPool> {
    order.iter().copied().find(|p| {
        p.backends
            .iter()
            .any(|b| health.state(b).is_some_and(BackendState::serves_new_flows))
    })
}

fn ids(pool: Option<&DesiredPool>, by_name: &BTreeMap<&str, u32>) -> Vec<u32> {
    pool.map(|p| {
        p.backends
            .iter()
            .filter_map(|b| by_name.get(b.as_str()).copied())
            .collect()
    })
    .unwrap_or_default()
}

/// The `VipSpec` (its own ring from the active pool, one class ring per class from the class's
/// pool order) and the pool choices for one VIP.
pub fn vip_spec(
    v: &DesiredVip,
    health: &Health,
    by_name: &BTreeMap<&str, u32>,
) -> (VipSpec, Vec<PoolChoice>) {
    let mut by_priority: Vec<&DesiredPool> = v.pools.iter().collect();
    // Stable: equal priorities keep file order.
    by_priority.sort_by_key(|p| std::cmp::Reverse(p.priority));
    let active = active_pool(&by_priority, health);
    let standby = |a: Option<&DesiredPool>, order: &[&DesiredPool]| {
        a.is_some_and(|a| order.first().is_some_and(|f| f.name != a.name))
    };
    let mut choices = vec![PoolChoice {
        vip: v.name.clone(),
        class: None,
        pool: active.map(|p| p.name.clone()),
        standby: standby(active, &by_priority),
    }];
    let mut spec = v.template.clone();
    // With no healthy pool, keep the top pool listed: its ring has no up member, so new flows are
    // dropped and counted, and draining/down members keep their data-plane state.
    spec.backends = ids(active.or(by_priority.first().copied()), by_name);
    spec.classes = v
        .classes
        .iter()
        .map(|c| {
            let order: Vec<&DesiredPool> = c
                .pool_order
                .iter()
                .filter_map(|n| v.pools.iter().find(|p| &p.name == n))
                .collect();
            let a = active_pool(&order, health);
            choices.push(PoolChoice {
                vip: v.name.clone(),
                class: Some(c.name.clone()),
                pool: a.map(|p| p.name.clone()),
                standby: standby(a, &order),
            });
            ClassSpec {
                dscp: c.dscp.clone(),
                ring_id: c.ring_id,
                backends: ids(a.or(order.first().copied()), by_name),
            }
        })
        .collect();
    (spec, choices)
}

/// What one reconcile pass did.
#[derive(Clone, Debug, Default)]
pub struct Reconciled {
    pub report: ApplyReport,
    pub choices: Vec<PoolChoice>,
    pub backends_written: usize,
    pub vips_written: usize,
    pub removed_vips: usize,
    pub removed_backends: usize,
}

/// Brings the data plane to `desired` under `health`: new/changed backends first, then VIP rings
/// and entries (deltas only), then removals (VIPs before the backends they listed).
pub fn reconcile<W: MapWriter>(
    dp: &mut Dataplane<W>,
    desired: &Desired,
    health: &Health,
) -> Result<Reconciled, DataplaneError> {
    let mut out = Reconciled::default();
    let by_name: BTreeMap<&str, u32> = desired
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.spec.id))
        .collect();
    for b in &desired.backends {
        let mut spec = b.spec.clone();
        spec.state = health
            .state(&b.name)
            .unwrap_or(BackendState::Unknown)
            .dataplane();
        if dp.backend(spec.id) != Some(&spec) {
            add(&mut out.report, dp.upsert_backend(spec)?);
            out.backends_written += 1;
        }
    }
    add(&mut out.report, dp.set_id_ranges(&desired.id_ranges)?);
    let mut wanted_keys: HashSet<VipKey> = HashSet::new();
    for v in &desired.vips {
        let (spec, choices) = vip_spec(v, health, &by_name);
        out.choices.extend(choices);
        wanted_keys.insert(spec.key);
        if dp.vip(&spec.key) != Some(&spec) {
            add(&mut out.report, dp.upsert_vip(spec)?);
            out.vips_written += 1;
        }
    }
    let stale: Vec<VipKey> = dp
        .vips()
        .map(|v| v.key)
        .filter(|k| !wanted_keys.contains(k))
        .collect();
    for k in stale {
        add(&mut out.report, dp.remove_vip(&k)?);
        out.removed_vips += 1;
    }
    let wanted_ids: BTreeSet<u32> = by_name.values().copied().collect();
    let stale: Vec<u32> = dp
        .backends()
        .map(|b| b.id)
        .filter(|id| !wanted_ids.contains(id))
        .collect();
    for id in stale {
        add(&mut out.report, dp.remove_backend(id)?);
        out.removed_backends += 1;
    }
    Ok(out)
}

fn add(total: &mut ApplyReport, r: ApplyReport) {
    total.ring_slots_written += r.ring_slots_written;
    total.maps_written += r.maps_written;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::{Admin, BackendHealth};
    use crate::dataplane::maps::{MapReader, MemMaps, Recording};
    use std::net::IpAddr;
    use std::time::Instant;
    use vpnlb_common::{
        BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, FWD_MODE_L2DSR, PROTO_UDP, VIP_F_CLASSES,
        class_slot_index,
    };

    const M: u32 = 251;

    fn backend(name: &str, id: u32) -> DesiredBackend {
        DesiredBackend {
            name: name.into(),
            spec: BackendSpec {
                id,
                addr: format!("10.0.0.{id}").parse().unwrap(),
                mac: [2, 0, 0, 0, 0, id as u8],
                src_mac: [2, 0, 0, 0, 0, 0xfe],
                ifindex: 0,
                weight: 1,
                state: 0,
            },
        }
    }

    fn desired() -> Desired {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        Desired {
            backends: vec![backend("gw1", 1), backend("gw2", 2), backend("gw3", 3)],
            id_ranges: Vec::new(),
            vips: vec![DesiredVip {
                name: "ovpn".into(),
                template: VipSpec {
                    key: VipKey::new(ip, 1194, PROTO_UDP),
                    vip_id: 0,
                    ring_id: 0,
                    ring_size: M,
                    flags: 0,
                    fwd_mode: FWD_MODE_L2DSR,
                    mtu: 0,
                    idle_timeout_ns: 0,
                    gue_port: 0,
                    backends: vec![],
                    classes: vec![],
                },
                pools: vec![
                    DesiredPool {
                        name: "standby".into(),
                        priority: 50,
                        backends: vec!["gw3".into()],
                    },
                    DesiredPool {
                        name: "primary".into(),
                        priority: 100,
                        backends: vec!["gw1".into(), "gw2".into()],
                    },
                ],
                classes: vec![DesiredClass {
                    name: "bulk".into(),
                    dscp: vec![8, 10],
                    ring_id: 1,
                    pool_order: vec!["standby".into(), "primary".into()],
                }],
            }],
        }
    }

    fn health(up: &[&str]) -> Health {
        let t = Instant::now();
        let mut h = Health::default();
        for (i, n) in ["gw1", "gw2", "gw3"].iter().enumerate() {
            let mut b = BackendHealth::new(
                n,
                i as u32 + 1,
                vec![("icmp".into(), 1, 1)],
                t,
                std::time::SystemTime::UNIX_EPOCH,
            );
            let r = crate::health::CheckResult {
                backend_id: i as u32 + 1,
                check_index: 0,
                generation: 0,
                ok: up.contains(n),
                latency: None,
                phases: Vec::new(),
                detail: String::new(),
                at: t,
            };
            b.on_result(&r, t, std::time::SystemTime::UNIX_EPOCH);
            h.backends.insert(n.to_string(), b);
        }
        h
    }

    fn members(m: &MemMaps, ring: u32) -> BTreeSet<u32> {
        m.ring(ring, M).unwrap().into_iter().collect()
    }

    #[test]
    fn pools_fail_over_and_back_and_classes_use_their_own_order() {
        let d = desired();
        let mut dp = Dataplane::with_ring_rows(MemMaps::new(), 4);
        let r = reconcile(&mut dp, &d, &health(&["gw1", "gw2", "gw3"])).unwrap();
        assert_eq!(
            members(dp.writer(), 0),
            BTreeSet::from([1, 2]),
            "primary serves"
        );
        assert_eq!(
            members(dp.writer(), 1),
            BTreeSet::from([3]),
            "class bulk prefers standby"
        );
        assert_eq!(r.choices[0].pool.as_deref(), Some("primary"));
        assert_eq!(
            r.choices[1],
            PoolChoice {
                vip: "ovpn".into(),
                class: Some("bulk".into()),
                pool: Some("standby".into()),
                // The class's own order puts standby first.
                standby: false,
            }
        );
        let m = dp.writer();
        let meta = m.vips.values().next().unwrap();
        assert_eq!(meta.flags & VIP_F_CLASSES, VIP_F_CLASSES);
        assert_eq!(m.class_rings.get(&class_slot_index(0, 8)), Some(&2));
        assert_eq!(m.class_rings.get(&class_slot_index(0, 10)), Some(&2));
        assert_eq!(m.class_rings.get(&class_slot_index(0, 0)), None);

        // Nothing changed: nothing written.
        let r = reconcile(&mut dp, &d, &health(&["gw1", "gw2", "gw3"])).unwrap();
        assert_eq!(
            (
                r.backends_written,
                r.vips_written,
                r.report.ring_slots_written
            ),
            (0, 0, 0)
        );

        // One primary member down: the pool still serves, with the other member only.
        reconcile(&mut dp, &d, &health(&["gw2", "gw3"])).unwrap();
        assert_eq!(members(dp.writer(), 0), BTreeSet::from([2]));
        assert_eq!(dp.writer().backend(1).unwrap().state, BACKEND_DOWN);
        // Both down: the standby pool takes over.
        let r = reconcile(&mut dp, &d, &health(&["gw3"])).unwrap();
        assert_eq!(members(dp.writer(), 0), BTreeSet::from([3]));
        assert_eq!(r.choices[0].pool.as_deref(), Some("standby"));
        // Standby dies too: the class falls back to primary order... which has no healthy member
        // either: rings hold no usable backend and new flows are dropped (counted).
        let r = reconcile(&mut dp, &d, &health(&[])).unwrap();
        assert_eq!(r.choices[0].pool, None);
        assert_eq!(members(dp.writer(), 0), BTreeSet::from([0]));
        // gw1 back: primary serves again; class bulk uses primary while standby is down.
        let r = reconcile(&mut dp, &d, &health(&["gw1"])).unwrap();
        assert_eq!(members(dp.writer(), 0), BTreeSet::from([1]));
        assert_eq!(members(dp.writer(), 1), BTreeSet::from([1]));
        assert_eq!(r.choices[1].pool.as_deref(), Some("primary"));
    }

    #[test]
    fn draining_leaves_rings_but_keeps_its_state() {
        let d = desired();
        let mut dp = Dataplane::with_ring_rows(MemMaps::new(), 4);
        let mut h = health(&["gw1", "gw2", "gw3"]);
        h.backends.get_mut("gw1").unwrap().set_admin(
            Admin::Drain,
            Instant::now(),
            std::time::SystemTime::UNIX_EPOCH,
        );
        reconcile(&mut dp, &d, &h).unwrap();
        assert_eq!(members(dp.writer(), 0), BTreeSet::from([2]));
        assert_eq!(dp.writer().backend(1).unwrap().state, BACKEND_DRAINING);
        assert_eq!(dp.writer().backend(2).unwrap().state, BACKEND_UP);
    }

    #[test]
    fn removed_vips_and_backends_are_removed_vip_first() {
        let d = desired();
        let mut dp = Dataplane::with_ring_rows(Recording::new(MemMaps::new()), 4);
        let h = health(&["gw1", "gw2", "gw3"]);
        reconcile(&mut dp, &d, &h).unwrap();
        dp.writer_mut().log.clear();
        let mut smaller = d.clone();
        smaller.vips.clear();
        smaller.backends.truncate(2);
        let r = reconcile(&mut dp, &smaller, &h).unwrap();
        assert_eq!((r.removed_vips, r.removed_backends), (1, 1));
        // The order, not just the end state: the VIP entry goes first (no packet can reach its
        // rings any more), then its rings and class entries, then the backend it listed.
        let log = &dp.writer().log;
        let pos = |what: &str| {
            log.iter()
                .position(|l| l.starts_with(what))
                .unwrap_or_else(|| panic!("no {what:?} in {log:?}"))
        };
        assert!(pos("remove_vip") < pos("ring 0"), "{log:?}");
        assert!(pos("remove_vip") < pos("class 0/8=0"), "{log:?}");
        assert!(pos("ring 0") < pos("clear_backend 3"), "{log:?}");
        assert!(pos("ring 1") < pos("clear_backend 3"), "{log:?}");
        let m = &dp.writer().inner;
        assert!(m.vips.is_empty());
        assert!(
            m.class_rings.is_empty(),
            "class entries cleared with the VIP"
        );
        assert_eq!(members(m, 0), BTreeSet::from([0]));
        assert_eq!(members(m, 1), BTreeSet::from([0]));
        assert_eq!(m.backend(3).unwrap().state, vpnlb_common::BACKEND_UNUSED);
        assert_eq!(m.backend(1).unwrap().state, BACKEND_UP);
    }

    #[test]
    fn static_id_ranges_follow_the_config_and_leave_before_their_backend() {
        use crate::dataplane::session_ids::esp_range_prefixes;
        let mut d = desired();
        let gw3 = esp_range_prefixes(0xc300_0000, 0xc3ff_ffff);
        d.id_ranges = gw3.iter().map(|p| (*p, 3)).collect();
        let mut dp = Dataplane::with_ring_rows(MemMaps::new(), 4);
        let h = health(&["gw1", "gw2", "gw3"]);
        reconcile(&mut dp, &d, &h).unwrap();
        assert_eq!(
            dp.writer().id_ranges,
            gw3.iter().map(|p| (*p, 3)).collect(),
            "gw3's range installed"
        );
        let r = reconcile(&mut dp, &d, &h).unwrap();
        assert_eq!(
            r.report.maps_written, 0,
            "nothing rewritten when nothing changed"
        );
        // gw3 leaves the config: its range goes with it (before its BACKENDS entry is cleared).
        let mut smaller = d.clone();
        smaller.vips.clear();
        smaller.backends.truncate(2);
        smaller.id_ranges.clear();
        reconcile(&mut dp, &smaller, &h).unwrap();
        assert!(dp.writer().id_ranges.is_empty());
    }
}
