//! The dataplane API against MemMaps: ring contents, deltas, make-before-break order,
//! validation (nothing written on error) and state changes.

use std::net::IpAddr;

use vpnlb_common::maglev::{self, MaglevBackend};

use super::*;
use crate::dataplane::maps::{MapReader, MemMaps, Recording};

type Rec = Recording<MemMaps>;

fn gw(id: u32, last: u8) -> BackendSpec {
    BackendSpec {
        id,
        addr: IpAddr::from([10, 1, 0, last]),
        mac: [2, 0, 0, 0, 0, last],
        src_mac: [2, 0, 0, 0, 0, 1],
        ifindex: 0,
        weight: 1,
        state: BACKEND_UP,
    }
}

fn vip(port: u16, ring_id: u32, backends: Vec<u32>) -> VipSpec {
    VipSpec {
        key: VipKey::new("192.0.2.10".parse().unwrap(), port, PROTO_UDP),
        vip_id: 1,
        ring_id,
        ring_size: 251,
        flags: 0,
        fwd_mode: FWD_MODE_L2DSR,
        mtu: 0,
        idle_timeout_ns: 0,
        gue_port: 0,
        backends,
        classes: Vec::new(),
    }
}

fn dp_with(n: u32) -> Dataplane<Rec> {
    let mut dp = Dataplane::new(Rec::new(MemMaps::new()));
    for i in 1..=n {
        dp.upsert_backend(gw(i, i as u8)).unwrap();
    }
    dp.writer_mut().log.clear();
    dp
}

/// The table Maglev builds for these backend ids (all up, keys = address octets).
fn expected_table(specs: &[BackendSpec], size: u32) -> Vec<u32> {
    let keys: Vec<_> = specs
        .iter()
        .map(|b| (b.id, b.maglev_key(), b.weight))
        .collect();
    let mb: Vec<_> = keys
        .iter()
        .map(|(id, k, w)| MaglevBackend {
            id: *id,
            key: k,
            weight: *w,
        })
        .collect();
    maglev::build(&mb, size).unwrap()
}

fn ring_of(m: &MemMaps, ring_id: u32, size: u32) -> Vec<u32> {
    m.ring(ring_id, size).unwrap()
}

#[test]
fn vip_is_written_backends_then_ring_then_vip() {
    let mut dp = Dataplane::new(Rec::new(MemMaps::new()));
    let r1 = dp
        .upsert_backend(BackendSpec {
            ifindex: 7,
            ..gw(1, 1)
        })
        .unwrap();
    assert_eq!(
        r1,
        ApplyReport {
            ring_slots_written: 0,
            maps_written: 2
        }
    );
    dp.upsert_backend(gw(2, 2)).unwrap();
    let r = dp.upsert_vip(vip(500, 4, vec![1, 2])).unwrap();
    // The fragment VIP entry of the address follows the VIP entry it names.
    assert_eq!(
        dp.writer().kinds(),
        ["tx", "backend", "backend", "ring", "vip", "frag_vip"]
    );
    assert_eq!(
        r,
        ApplyReport {
            ring_slots_written: 251,
            maps_written: 2
        }
    );
    let m = &dp.writer().inner;
    let want = expected_table(&[gw(1, 1), gw(2, 2)], 251);
    assert_eq!(ring_of(m, 4, 251), want);
    assert_eq!(dp.installed_ring(4), Some(&want[..]));
    assert_eq!(m.vips[&vip(500, 4, vec![]).key], vip(500, 4, vec![]).meta());
    assert_eq!(
        m.backend(1).unwrap(),
        BackendSpec {
            ifindex: 7,
            ..gw(1, 1)
        }
        .to_backend()
    );
    assert_eq!(m.backend(1).unwrap().family, 4);
    assert!(m.tx_port(7).unwrap());
    // Same request again: nothing to write.
    dp.writer_mut().log.clear();
    let r = dp.upsert_vip(vip(500, 4, vec![2, 1])).unwrap();
    assert_eq!(r, ApplyReport::default());
    assert!(dp.writer().log.is_empty(), "{:?}", dp.writer().log);
}

#[test]
fn hosts_with_the_same_config_agree() {
    // Host B numbers its backends differently and adds them in another order: the ring maps
    // every slot to the same gateway address.
    let mut a = dp_with(3);
    a.upsert_vip(vip(500, 0, vec![1, 2, 3])).unwrap();
    let mut b = Dataplane::new(MemMaps::new());
    for (id, last) in [(30, 3), (10, 1), (20, 2)] {
        b.upsert_backend(gw(id, last)).unwrap();
    }
    b.upsert_vip(vip(500, 0, vec![20, 30, 10])).unwrap();
    let addr = |dp_ring: &[u32], f: &dyn Fn(u32) -> IpAddr| {
        dp_ring.iter().map(|id| f(*id)).collect::<Vec<_>>()
    };
    let ra = addr(a.installed_ring(0).unwrap(), &|id| {
        a.backend(id).unwrap().addr
    });
    let rb = addr(b.installed_ring(0).unwrap(), &|id| {
        b.backend(id).unwrap().addr
    });
    assert_eq!(ra, rb);
}

#[test]
fn state_changes_rewrite_every_ring_listing_the_backend() {
    let mut dp = dp_with(4);
    dp.upsert_vip(vip(500, 0, vec![1, 2, 3])).unwrap();
    let mut v2 = vip(4500, 1, vec![2, 3, 4]);
    v2.vip_id = 2;
    dp.upsert_vip(v2).unwrap();
    let before0 = dp.installed_ring(0).unwrap().to_vec();
    let owned = before0.iter().filter(|id| **id == 2).count();
    dp.writer_mut().log.clear();

    let r = dp.set_backend_state(2, BACKEND_DOWN).unwrap();
    // Backend entry first, then both rings, in the same call.
    assert_eq!(dp.writer().kinds(), ["backend", "ring", "ring"]);
    let m = &dp.writer().inner;
    assert_eq!(m.backend(2).unwrap().state, BACKEND_DOWN);
    assert_eq!(
        ring_of(m, 0, 251),
        expected_table(&[gw(1, 1), gw(3, 3)], 251)
    );
    assert_eq!(
        ring_of(m, 1, 251),
        expected_table(&[gw(3, 3), gw(4, 4)], 251)
    );
    // Only a delta was written: at least backend 2's slots, far fewer than two full rings.
    assert!(
        r.ring_slots_written >= owned && r.ring_slots_written < 251,
        "{r:?}"
    );
    assert_eq!(r.maps_written, 1);

    // Draining is out of the ring too; back up restores the original table exactly.
    dp.set_backend_state(2, BACKEND_DRAINING).unwrap();
    assert!(!dp.installed_ring(0).unwrap().contains(&2));
    assert_eq!(
        dp.writer().inner.backend(2).unwrap().state,
        BACKEND_DRAINING
    );
    dp.set_backend_state(2, BACKEND_UP).unwrap();
    assert_eq!(dp.installed_ring(0).unwrap(), &before0[..]);
    assert_eq!(ring_of(&dp.writer().inner, 0, 251), before0);
}

#[test]
fn weight_and_address_changes_rebuild_rings() {
    let mut dp = dp_with(2);
    dp.upsert_vip(vip(500, 0, vec![1, 2])).unwrap();
    dp.upsert_backend(BackendSpec {
        weight: 3,
        ..gw(2, 2)
    })
    .unwrap();
    let t = dp.installed_ring(0).unwrap();
    let twos = t.iter().filter(|id| **id == 2).count();
    assert!(twos > 251 * 2 / 3, "weight 3 of 4: {twos}");
    dp.upsert_backend(BackendSpec {
        weight: 0,
        ..gw(2, 2)
    })
    .unwrap();
    assert!(
        dp.installed_ring(0).unwrap().iter().all(|id| *id == 1),
        "weight 0 leaves the ring"
    );
    // A MAC change is a backend write only.
    dp.writer_mut().log.clear();
    let r = dp
        .upsert_backend(BackendSpec {
            mac: [9; 6],
            ..gw(1, 1)
        })
        .unwrap();
    assert_eq!(dp.writer().kinds(), ["backend"]);
    assert_eq!(r.ring_slots_written, 0);
    // An address change moves the backend in the table.
    let before = dp.installed_ring(0).unwrap().to_vec();
    dp.upsert_backend(BackendSpec {
        weight: 1,
        ..gw(2, 2)
    })
    .unwrap();
    let with2 = dp.installed_ring(0).unwrap().to_vec();
    assert_ne!(before, with2);
    dp.upsert_backend(BackendSpec {
        addr: "10.1.0.77".parse().unwrap(),
        ..gw(2, 2)
    })
    .unwrap();
    assert_ne!(dp.installed_ring(0).unwrap(), &with2[..]);
}

#[test]
fn tx_ports_follow_backends() {
    let mut dp = Dataplane::new(Rec::new(MemMaps::new()));
    dp.upsert_backend(BackendSpec {
        ifindex: 7,
        ..gw(1, 1)
    })
    .unwrap();
    dp.upsert_backend(BackendSpec {
        ifindex: 7,
        ..gw(2, 2)
    })
    .unwrap();
    dp.upsert_backend(BackendSpec {
        ifindex: 8,
        ..gw(2, 2)
    })
    .unwrap();
    assert!(dp.writer().inner.tx_ports.contains(&7) && dp.writer().inner.tx_ports.contains(&8));
    dp.writer_mut().log.clear();
    dp.remove_backend(1).unwrap();
    assert_eq!(dp.writer().kinds(), ["clear_backend", "remove_tx"]);
    assert_eq!(
        dp.writer()
            .inner
            .tx_ports
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![8]
    );
    assert_eq!(dp.writer().inner.backend(1).unwrap(), Backend::default());
}

#[test]
fn removal_is_vip_then_ring_then_backends() {
    let mut dp = dp_with(2);
    dp.upsert_vip(vip(500, 3, vec![1, 2])).unwrap();
    assert!(matches!(
        dp.remove_backend(1),
        Err(DataplaneError::BackendInUse { id: 1, .. })
    ));
    dp.writer_mut().log.clear();
    let r = dp.remove_vip(&vip(500, 3, vec![]).key).unwrap();
    assert_eq!(
        dp.writer().kinds(),
        ["remove_vip", "ring", "remove_frag_vip"]
    );
    assert_eq!(
        r,
        ApplyReport {
            ring_slots_written: 251,
            maps_written: 2
        }
    );
    assert!(dp.writer().inner.vips.is_empty());
    assert_eq!(ring_of(&dp.writer().inner, 3, 251), vec![0; 251]);
    assert_eq!(dp.installed_ring(3), None);
    dp.remove_backend(1).unwrap();
    dp.remove_backend(2).unwrap();
    assert!(dp.writer().inner.backends().unwrap().is_empty());
    assert!(matches!(
        dp.remove_backend(2),
        Err(DataplaneError::UnknownBackend { id: 2 })
    ));
    assert!(matches!(
        dp.remove_vip(&vip(500, 3, vec![]).key),
        Err(DataplaneError::UnknownVip { .. })
    ));
}

#[test]
fn shared_rings() {
    let mut dp = dp_with(3);
    let ike = vip(500, 2, vec![1, 2]);
    let natt = vip(4500, 2, vec![2, 1]);
    dp.upsert_vip(ike.clone()).unwrap();
    let r = dp.upsert_vip(natt.clone()).unwrap();
    assert_eq!(r.ring_slots_written, 0, "the shared ring is already right");
    // One key alone cannot change a shared ring's backends...
    let e = dp.upsert_vip(vip(500, 2, vec![1, 2, 3])).unwrap_err();
    assert!(
        matches!(e, DataplaneError::RingConflict { ring_id: 2, .. }),
        "{e}"
    );
    let e = dp
        .upsert_vip(VipSpec {
            ring_size: 13,
            ..natt.clone()
        })
        .unwrap_err();
    assert!(matches!(e, DataplaneError::RingConflict { .. }), "{e}");
    // ...but both together can.
    dp.upsert_vips(vec![
        vip(500, 2, vec![1, 2, 3]),
        vip(4500, 2, vec![1, 2, 3]),
    ])
    .unwrap();
    assert_eq!(
        dp.installed_ring(2).unwrap(),
        expected_table(&[gw(1, 1), gw(2, 2), gw(3, 3)], 251)
    );
    // Removing one key keeps the shared ring.
    dp.remove_vip(&ike.key).unwrap();
    assert!(dp.installed_ring(2).is_some());
    assert!(
        ring_of(&dp.writer().inner, 2, 251)
            .iter()
            .all(|id| *id != 0)
    );
    dp.remove_vip(&natt.key).unwrap();
    assert!(dp.installed_ring(2).is_none());
}

#[test]
fn moving_and_shrinking_rings() {
    let mut dp = dp_with(2);
    dp.upsert_vip(vip(500, 0, vec![1, 2])).unwrap();
    dp.writer_mut().log.clear();
    // Move to ring 5: new ring, then the VIP entry, then the old ring zeroed.
    dp.upsert_vip(vip(500, 5, vec![1, 2])).unwrap();
    assert_eq!(dp.writer().log, ["ring 5 251", "vip 1", "ring 0 251"]);
    assert_eq!(ring_of(&dp.writer().inner, 0, 251), vec![0; 251]);
    assert!(dp.installed_ring(0).is_none());
    // Shrink to 13 slots: the new table, the VIP, then the slots past 13 trimmed.
    dp.writer_mut().log.clear();
    dp.upsert_vip(VipSpec {
        ring_size: 13,
        ..vip(500, 5, vec![1, 2])
    })
    .unwrap();
    assert_eq!(dp.writer().log, ["ring 5 13", "vip 1", "ring 5 238"]);
    let row = ring_of(&dp.writer().inner, 5, 251);
    assert!(row[..13].iter().all(|id| *id != 0) && row[13..].iter().all(|id| *id == 0));
    assert_eq!(dp.installed_ring(5).unwrap().len(), 13);
    // Grow back: a full write of the new size.
    let r = dp.upsert_vip(vip(500, 5, vec![1, 2])).unwrap();
    assert_eq!(r.ring_slots_written, 251);
    assert_eq!(
        ring_of(&dp.writer().inner, 5, 251),
        expected_table(&[gw(1, 1), gw(2, 2)], 251)
    );
}

#[test]
fn validation_rejects_and_writes_nothing() {
    let mut dp = dp_with(3);
    dp.upsert_backend(BackendSpec {
        addr: "10.1.0.1".parse().unwrap(),
        ..gw(9, 9)
    })
    .unwrap();
    dp.upsert_vip(vip(500, 0, vec![1, 2])).unwrap();
    let snapshot = dp.writer().inner.clone();
    dp.writer_mut().log.clear();
    let esp = VipKey::new("192.0.2.10".parse().unwrap(), 0, PROTO_ESP);
    let cases: Vec<(&str, Result<ApplyReport, DataplaneError>)> = vec![
        ("id 0", dp.upsert_backend(gw(0, 1))),
        ("id too big", dp.upsert_backend(gw(MAX_BACKENDS, 1))),
        (
            "unused state",
            dp.upsert_backend(BackendSpec {
                state: 0,
                ..gw(5, 5)
            }),
        ),
        ("state 4", dp.set_backend_state(1, 4)),
        ("unknown for state", dp.set_backend_state(5, BACKEND_UP)),
        (
            "address clash via backend",
            dp.upsert_backend(BackendSpec {
                addr: "10.1.0.1".parse().unwrap(),
                ..gw(2, 2)
            }),
        ),
        ("unknown backend", dp.upsert_vip(vip(501, 1, vec![1, 77]))),
        ("dup backend", dp.upsert_vip(vip(501, 1, vec![1, 1]))),
        ("dup address", dp.upsert_vip(vip(501, 1, vec![1, 9]))),
        (
            "vip id",
            dp.upsert_vip(VipSpec {
                vip_id: MAX_VIPS,
                ..vip(501, 1, vec![1])
            }),
        ),
        ("ring id", dp.upsert_vip(vip(501, MAX_VIPS, vec![1]))),
        (
            "ring size 0",
            dp.upsert_vip(VipSpec {
                ring_size: 0,
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "ring size 65535",
            dp.upsert_vip(VipSpec {
                ring_size: 65535,
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "ring size too big",
            dp.upsert_vip(VipSpec {
                ring_size: 65539,
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "fwd mode",
            dp.upsert_vip(VipSpec {
                fwd_mode: 3,
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "gue port",
            dp.upsert_vip(VipSpec {
                fwd_mode: FWD_MODE_GUE,
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "flags",
            dp.upsert_vip(VipSpec {
                flags: 2,
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "family",
            dp.upsert_vip(VipSpec {
                key: VipKey {
                    family: 5,
                    ..vip(501, 1, vec![]).key
                },
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "proto",
            dp.upsert_vip(VipSpec {
                key: VipKey {
                    proto: 1,
                    ..vip(501, 1, vec![]).key
                },
                ..vip(501, 1, vec![1])
            }),
        ),
        (
            "esp port",
            dp.upsert_vip(VipSpec {
                key: VipKey { port_be: 1, ..esp },
                ..vip(0, 1, vec![1])
            }),
        ),
        (
            "v4 words",
            dp.upsert_vip(VipSpec {
                key: VipKey {
                    addr: [1, 1, 0, 0],
                    ..esp
                },
                ..vip(0, 1, vec![1])
            }),
        ),
        ("ring conflict", dp.upsert_vip(vip(501, 0, vec![3]))),
        (
            "listed twice",
            dp.upsert_vips(vec![vip(501, 1, vec![1]), vip(501, 1, vec![1])]),
        ),
        ("in use", dp.remove_backend(2)),
        ("unknown remove", dp.remove_backend(5)),
        ("unknown vip", dp.remove_vip(&esp)),
    ];
    for (name, r) in cases {
        let e = r.expect_err(name);
        let msg = e.to_string();
        assert!(
            !msg.is_empty() && msg.chars().next().unwrap().is_lowercase(),
            "{name}: {msg}"
        );
    }
    assert!(
        dp.writer().log.is_empty(),
        "nothing written: {:?}",
        dp.writer().log
    );
    assert_eq!(dp.writer().inner, snapshot);
    // A ring id within MAX_VIPS but beyond the allocated rows.
    let mut small = Dataplane::with_ring_rows(MemMaps::new(), 2);
    small.upsert_backend(gw(1, 1)).unwrap();
    assert!(matches!(
        small.upsert_vip(vip(500, 2, vec![1])),
        Err(DataplaneError::BadRingId { rows: 2, .. })
    ));
    small.upsert_vip(vip(500, 1, vec![1])).unwrap();
}

#[test]
fn error_messages_name_the_culprit() {
    let mut dp = dp_with(1);
    let e = dp
        .upsert_vip(VipSpec {
            ring_size: 100,
            ..vip(4500, 1, vec![1])
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "vip udp 192.0.2.10:4500: ring size 100 is not a prime in 3..=65537"
    );
    let e = dp.upsert_vip(vip(4500, 1, vec![2])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "vip udp 192.0.2.10:4500 lists unknown backend 2"
    );
    let k = VipKey::new("2001:db8::1".parse().unwrap(), 0, PROTO_ESP);
    assert_eq!(vip_label(&k), "esp [2001:db8::1]");
}

#[test]
fn a_failed_write_forgets_the_ring_and_the_next_call_rewrites_it() {
    let mut dp = dp_with(2);
    dp.upsert_vip(vip(500, 0, vec![1, 2])).unwrap();
    let good = dp.installed_ring(0).unwrap().to_vec();
    // Fail the ring write of a state change (the backend write succeeds).
    dp.writer_mut().log.clear();
    dp.writer_mut().fail_at = Some(1);
    assert!(matches!(
        dp.set_backend_state(2, BACKEND_DOWN),
        Err(DataplaneError::Map { .. })
    ));
    assert_eq!(dp.installed_ring(0), None);
    assert_eq!(
        dp.backend(2).unwrap().state,
        BACKEND_UP,
        "the call did not take effect"
    );
    dp.writer_mut().fail_at = None;
    let r = dp.set_backend_state(2, BACKEND_UP).unwrap();
    assert_eq!(
        r.ring_slots_written, 251,
        "full rewrite after an unknown ring state"
    );
    assert_eq!(
        r.maps_written, 3,
        "after a failure every backend and VIP is rewritten"
    );
    assert_eq!(ring_of(&dp.writer().inner, 0, 251), good);
    assert_eq!(dp.writer().inner.backend(2).unwrap().state, BACKEND_UP);
    // Back to normal: deltas only.
    dp.writer_mut().log.clear();
    dp.set_backend_state(1, BACKEND_DRAINING).unwrap();
    assert_eq!(dp.writer().kinds(), ["backend", "ring"]);
}

#[test]
fn all_backends_down_leaves_an_empty_ring() {
    let mut dp = dp_with(2);
    dp.upsert_vip(vip(500, 0, vec![1, 2])).unwrap();
    dp.set_backend_state(1, BACKEND_DOWN).unwrap();
    dp.set_backend_state(2, BACKEND_DOWN).unwrap();
    assert_eq!(ring_of(&dp.writer().inner, 0, 251), vec![0; 251]);
    assert!(
        dp.writer()
            .inner
            .vips
            .contains_key(&vip(500, 0, vec![]).key),
        "the VIP stays (drops are counted)"
    );
}

#[test]
fn fragment_vips_name_the_lowest_port_of_each_address_and_protocol() {
    let mut dp = dp_with(2);
    let ike = vip(500, 1, vec![1, 2]);
    let natt = VipSpec {
        key: VipKey::new(ike.key.ip(), 4500, PROTO_UDP),
        vip_id: 2,
        ..ike.clone()
    };
    dp.upsert_vip(natt.clone()).unwrap();
    let portless = VipKey::new(ike.key.ip(), 0, PROTO_UDP);
    assert_eq!(dp.writer().inner.frag_vips[&portless], natt.key);
    dp.upsert_vip(ike.clone()).unwrap();
    assert_eq!(dp.writer().inner.frag_vips[&portless], ike.key);
    dp.remove_vip(&ike.key).unwrap();
    assert_eq!(dp.writer().inner.frag_vips[&portless], natt.key);
    dp.remove_vip(&natt.key).unwrap();
    assert!(dp.writer().inner.frag_vips.is_empty());
}
