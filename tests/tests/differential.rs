//! Differential test: the production XDP object (through `BPF_PROG_TEST_RUN`) and the userspace
//! reference model `vpnlb::dataplane::model`, both written independently from docs/datapath.md, run the same
//! packets on the same, evolving map state and must agree on everything observable.
//!
//! - Map state: a rich configuration programmed through the agent's own `Dataplane<AyaMaps>` (VIPs
//!   on the capture gateway addresses 10.200.0.10 / fd00::10 and synthetic ones, all three
//!   forwarding modes, backends of both families, small MTUs, an empty ring, draining, down and
//!   cleared backends, a backend whose egress is missing from `TX_PORTS`, a VIP with DSCP traffic
//!   classes), plus direct map writes the agent would refuse (unknown forwarding modes, ring sizes
//!   0 and beyond a row, ring ids past the allocated rows, u32-wrapping ring and class indexes, a
//!   backend without a family, ring slots naming dead or absent backends, hand-written
//!   `CLASS_RINGS` entries, seeded sessions). The model starts from `MemMaps::snapshot` of the real maps and is never reset:
//!   sessions recorded by earlier packets steer later ones in both.
//! - Packets: every frame of every `shared/captures/*-c2g.pcap` (beside the repository), synthetic packets for every
//!   VIP (IPv4/IPv6, VLAN, IPv4 options, padding, UDP/TCP/ESP, MTU boundaries, every PASS reason),
//!   then seeded mutations of both (`vpnlb_tests::mutate`), in two phases around a control-plane
//!   change (backends going down, draining and up, a class changing its DSCP set); `vpnlb_decap` runs on every encapsulated output
//!   (which must decapsulate back to the input), on mutations of them and on ingress inputs.
//! - Per packet: verdict, output bytes (except for drops), every `STATS` counter delta (exactly one
//!   outcome, the same `SESSION_*` events), and the VIP/backend stats rows of every configured id.
//!   Every `CHECK_EVERY` packets and at the end: the whole session table (key → backend) and every
//!   counter and stats row (all `MAX_VIPS` / `MAX_BACKENDS`).
//!
//! Time stays out of the comparison: idle timeouts are 0 except on one VIP whose timeout (1 h) is
//! far from every seeded or live session age, and session timestamps are not compared.
//!
//! On the first mismatch: a pcap (input, XDP output, model output) under
//! `<target>/fixture-pcaps/` and a panic with the packet index, its hex and both results.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use vpnlb::dataplane::maps::{MapReader, MapWriter, MemMaps};
use vpnlb::dataplane::model::{self, ModelCtx, ModelResult};
use vpnlb::dataplane::{ClassSpec, VipSpec};
use vpnlb_common::maglev::SlotChange;
use vpnlb_common::*;
use vpnlb_tests::harness::{
    Harness, MAX_SESSIONS, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, action_name, backend,
    counter_name, pcap_dir,
};
use vpnlb_tests::mutate::{self, Rng, Targets};
use vpnlb_tests::packet::{self, Frame, L4, hexdump_diff};
use vpnlb_tests::pcap;

/// Seed of the mutation RNG: change it and the mutants change.
const SEED: u64 = 0x7670_6e6c_d1ff;
/// Mutated ingress packets per phase (two phases).
const MUTATIONS_PER_PHASE: usize = 15_000;
/// Full comparison (sessions, every counter and stats row) every this many ingress packets.
const CHECK_EVERY: usize = 1000;
/// Sessions beyond this are pruned at a checkpoint (from both sides, keeping the base flows): the
/// real LRU (per-CPU lists, `MAX_SESSIONS` / 2 CPUs per list) must never evict.
const PRUNE_ABOVE: usize = 600;

const LO: u32 = 1;
const GUE_PORT: u16 = 6080;
const OTHER_GUE_PORT: u16 = 7777;
const IDLE_TIMEOUT_NS: u64 = 3600 * 1_000_000_000;
/// Age of the "stale" seeded sessions (wrapping, so the host's uptime does not matter).
const STALE_NS: u64 = 7200 * 1_000_000_000;

const GW4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 200, 0, last))
}
fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
}
fn g4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, n))
}
fn g6(n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, n))
}
/// Synthetic clients.
fn client(v6: bool, k: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, u16::from(k)))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, k))
    }
}

fn config() -> GlobalConfig {
    GlobalConfig {
        encap_src_v4: u32::from_ne_bytes([192, 0, 2, 0]),
        encap_src_v4_hash_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
        encap_src_v6: addr_words("fd00:1b::".parse().unwrap()).0,
        encap_src_v6_hash_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        // On, but far above anything this test sends: the window code runs, nothing is skipped.
        flood_max_inserts_per_sec: 1_000_000,
        decap_gue_port: GUE_PORT,
        replicate: 0,
        _pad: [0; 5],
    }
}

// ------------------------------------------------------------------------------------------------
// The map state.

/// One VIP of the test configuration.
#[derive(Clone, Debug)]
struct VipDef {
    addr: IpAddr,
    port: u16,
    proto: u8,
    vip_id: u32,
    ring_id: u32,
    ring_size: u32,
    mode: u32,
    flags: u32,
    mtu: u32,
    idle: u64,
    gue_port: u16,
    /// Written straight into `VIPS` (the agent would refuse it), not through `Dataplane`.
    direct: bool,
    /// Traffic classes: (DSCP values, class ring id); the ring's members come from [`RINGS`].
    classes: Vec<(Vec<u8>, u32)>,
}

impl VipDef {
    fn key(&self) -> VipKey {
        VipKey::new(self.addr, self.port, self.proto)
    }
}

/// Members of the agent-managed rings (ring id → backend ids), all `RING_ROWS` = 4 rows.
const RINGS: [(u32, u32, &[u32]); 4] = [
    (0, 251, &[1, 2, 3, 4, 5, 6]),
    (1, 13, &[7, 8, 1]),
    // Only a down backend: the ring is empty (new flows DROP_NO_BACKEND). Also the class ring of
    // udp 10.200.0.20:51820 (hence the same size as ring 1).
    (2, 13, &[6]),
    (3, 17, &[2, 5]),
];

/// `CLASS_RINGS` entries written by hand for VIP 30: (DSCP, class ring id + 1).
const CLASS_SLOTS: [(u8, u32); 3] = [(46, 1 + 1), (10, 9 + 1), (0, 3 + 1)];

/// Ring-3 slots rewritten by hand so the ring names backends that are down, never written, without
/// a family, cleared, outside `BACKENDS`, draining, or IPv6.
const RING3_SLOTS: [(u32, u32); 7] = [
    (1, 6),
    (3, 9),
    (5, 10),
    (7, 11),
    (9, 5000),
    (11, 5),
    (13, 4),
];

#[allow(clippy::too_many_arguments)]
fn def(
    addr: IpAddr,
    port: u16,
    proto: u8,
    vip_id: u32,
    ring_id: u32,
    mode: u32,
    flags: u32,
    mtu: u32,
) -> VipDef {
    let ring_size = RINGS.iter().find(|r| r.0 == ring_id).map_or(13, |r| r.1);
    VipDef {
        addr,
        port,
        proto,
        vip_id,
        ring_id,
        ring_size,
        mode,
        flags,
        mtu,
        idle: 0,
        gue_port: GUE_PORT,
        direct: false,
        classes: Vec::new(),
    }
}

fn vip_defs() -> Vec<VipDef> {
    let (gw4, gw6) = (IpAddr::V4(GW4), IpAddr::V6(GW6));
    let (u, t, e) = (PROTO_UDP, PROTO_TCP, PROTO_ESP);
    let (l2, ipip, gue) = (FWD_MODE_L2DSR, FWD_MODE_IPIP, FWD_MODE_GUE);
    let src = VIP_F_HASH_SRC_ONLY;
    // Session ids: the capture gateway's VIPs learn their protocol's ids (IPsec as a group).
    let (wg, ipsec, ovpn) = (VIP_F_IDS_WIREGUARD, VIP_F_IDS_IPSEC, VIP_F_IDS_OPENVPN);
    let mut v = vec![
        // The capture gateway, ring 0.
        def(gw4, 51820, u, 0, 0, l2, wg, 0),
        def(gw4, 500, u, 1, 0, ipip, src | ipsec, 0),
        def(gw4, 4500, u, 2, 0, ipip, src | ipsec, 0),
        def(gw4, 0, e, 3, 0, ipip, src | ipsec, 0),
        def(gw4, 1194, u, 4, 0, gue, ovpn, 600),
        def(gw4, 443, t, 5, 0, gue, 0, 0),
        def(gw6, 51820, u, 6, 0, gue, wg, 0),
        def(gw6, 500, u, 7, 0, l2, src | ipsec, 0),
        def(gw6, 4500, u, 8, 0, l2, ipsec, 0),
        def(gw6, 0, e, 9, 0, l2, ipsec, 0),
        def(gw6, 443, t, 10, 0, ipip, 0, 0),
        def(gw6, 1194, u, 11, 0, ipip, ovpn, 1280),
        // Synthetic VIPs, ring 1 (a backend whose egress is missing from TX_PORTS).
        def(v4(20), 51820, u, 12, 1, l2, wg, 0),
        def(v6(0x20), 51820, u, 13, 1, gue, 0, 0),
        def(v4(20), 443, t, 14, 1, ipip, 0, 120),
        def(v6(0x20), 0, e, 15, 1, gue, src | ipsec, 0),
        def(v4(20), 4500, u, 16, 1, l2, src | ipsec, 0),
        def(v6(0x20), 443, t, 17, 1, l2, 0, 0),
        // Ring 2: no usable backend.
        def(v4(30), 51820, u, 18, 2, l2, wg, 0),
        def(v6(0x30), 443, t, 19, 2, ipip, 0, 0),
        def(v4(30), 0, e, 20, 2, gue, ipsec, 0),
        // Ring 3: slots naming unusable backends.
        def(v4(40), 51820, u, 21, 3, ipip, wg, 0),
        def(v6(0x40), 51820, u, 22, 3, l2, 0, 0),
        def(v4(40), 443, t, 23, 3, gue, 0, 0),
        def(v6(0x40), 0, e, 24, 3, ipip, 0, 0),
    ];
    // GUE to a port the decap program does not listen on.
    v[13].gue_port = OTHER_GUE_PORT;
    // The one VIP with an idle timeout (seeded sessions are far older, live ones far younger).
    v[16].idle = IDLE_TIMEOUT_NS;
    // Traffic classes: EF and AF41 new flows pick from ring 2.
    v[12].classes = vec![(vec![46, 34], 2)];
    // Written directly: things the agent refuses.
    let direct = |mut d: VipDef| {
        d.direct = true;
        d
    };
    // Unknown forwarding modes: DROP_BACKEND_BAD after the session stage.
    v.push(direct(def(v4(50), 51820, u, 25, 0, 7, 0, 0)));
    v.push(direct(def(v6(0x50), 443, t, 29, 1, 3, 0, 0)));
    // ring_size 0: no table.
    let mut d = direct(def(v4(50), 500, u, 26, 0, l2, 0, 0));
    d.ring_size = 0;
    v.push(d);
    // A ring row past the allocated ones: every slot reads 0.
    v.push(direct(def(v4(50), 4500, u, 27, 9, ipip, 0, 0)));
    // A ring larger than a row: slots spill into row 3; vip_id outside VIP_STATS.
    let mut d = direct(def(v6(0x50), 51820, u, 200, 2, l2, 0, 0));
    d.ring_size = 131_071;
    v.push(d);
    // ring_id × RING_SIZE_MAX wraps in u32: 0x10000 × 65537 = 65536 (mod 2^32), i.e. row 0 slot
    // 65536, then row 1. And GUE with no gue_port (the agent refuses it; the program sends to 0).
    let mut d = direct(def(v6(0x50), 500, u, 28, 0x1_0000, gue, 0, 0));
    d.ring_size = 13;
    d.gue_port = 0;
    v.push(d);
    // VIP_F_CLASSES with hand-written CLASS_RINGS entries (see `CLASS_SLOTS`): a class ring whose
    // row is shorter than the VIP's ring size, one past the allocated rows, DSCP 0 mapped.
    let mut d = direct(def(v4(50), 443, t, 30, 0, l2, VIP_F_CLASSES, 0));
    d.ring_size = 251;
    v.push(d);
    // vip_id × 64 + DSCP wraps in u32: 2^26 + 30 reads VIP 30's class entries (and VIP_STATS has
    // no row for it).
    let mut d = direct(def(
        v6(0x50),
        4500,
        u,
        (1 << 26) + 30,
        0,
        ipip,
        VIP_F_CLASSES,
        0,
    ));
    d.ring_size = 251;
    v.push(d);
    v
}

fn vip_spec(d: &VipDef) -> VipSpec {
    let members = RINGS
        .iter()
        .find(|r| r.0 == d.ring_id)
        .expect("managed ring")
        .2;
    VipSpec {
        key: d.key(),
        vip_id: d.vip_id,
        ring_id: d.ring_id,
        ring_size: d.ring_size,
        flags: d.flags,
        fwd_mode: d.mode,
        mtu: d.mtu,
        idle_timeout_ns: d.idle,
        gue_port: d.gue_port,
        backends: members.to_vec(),
        classes: d
            .classes
            .iter()
            .map(|(dscp, ring_id)| ClassSpec {
                dscp: dscp.clone(),
                ring_id: *ring_id,
                backends: RINGS
                    .iter()
                    .find(|r| r.0 == *ring_id)
                    .expect("managed class ring")
                    .2
                    .to_vec(),
            })
            .collect(),
    }
}

fn vip_meta(d: &VipDef) -> VipMeta {
    VipMeta {
        vip_id: d.vip_id,
        ring_id: d.ring_id,
        ring_size: d.ring_size,
        flags: d.flags,
        fwd_mode: d.mode,
        mtu: d.mtu,
        idle_timeout_ns: d.idle,
        gue_port: d.gue_port,
        _pad: [0; 6],
    }
}

/// CLOCK_MONOTONIC_COARSE, the clock `bpf_ktime_get_coarse_ns` reads.
fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn write_ring3_slots(h: &mut Harness) {
    let changes: Vec<SlotChange> = RING3_SLOTS
        .iter()
        .map(|&(slot, backend_id)| SlotChange { slot, backend_id })
        .collect();
    h.maps_mut()
        .write_ring(3, &changes)
        .unwrap_or_else(|e| panic!("ring 3 slots: {e}"));
}

/// Loads the object in a private netns and programs the whole configuration.
fn program(h: &mut Harness) {
    let (veth0, veth1) = h.netns.as_ref().expect("netns").veth;
    h.set_config(config());
    for b in [
        backend(1, g4(1), 0, BACKEND_UP),
        backend(2, g4(2), veth1, BACKEND_UP),
        backend(3, g6(3), 0, BACKEND_UP),
        backend(4, g6(4), veth0, BACKEND_UP),
        backend(5, g4(5), 0, BACKEND_DRAINING),
        backend(6, g4(6), 0, BACKEND_DOWN),
        // Its egress (lo) gets a TX_PORTS entry from the agent, removed below.
        backend(7, g4(7), LO, BACKEND_UP),
        backend(8, g6(8), veth1, BACKEND_UP),
        backend(11, g4(11), 0, BACKEND_UP),
    ] {
        h.upsert_backend(b);
    }
    // Cleared slot: written, then removed (BACKENDS[11] = Backend::default(), state 0).
    h.dp.remove_backend(11)
        .unwrap_or_else(|e| panic!("remove_backend 11: {e}"));
    let defs = vip_defs();
    let specs: Vec<VipSpec> = defs.iter().filter(|d| !d.direct).map(vip_spec).collect();
    h.dp.upsert_vips(specs)
        .unwrap_or_else(|e| panic!("upsert_vips: {e}"));
    // Direct writes (after the agent's, which never touches these again).
    let m = h.maps_mut();
    for d in defs.iter().filter(|d| d.direct) {
        m.set_vip(&d.key(), &vip_meta(d))
            .unwrap_or_else(|e| panic!("set_vip: {e}"));
    }
    // A usable backend without an address family (encapsulation: DROP_BACKEND_BAD).
    m.set_backend(
        10,
        &Backend {
            mac: [0x02, 0xbb, 0, 0, 0, 10],
            src_mac: [0x02, 0xaa, 0, 0, 0, 1],
            weight: 1,
            state: BACKEND_UP,
            family: 0,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("set_backend 10: {e}"));
    for (dscp, ring_plus1) in CLASS_SLOTS {
        m.set_class_ring(30, dscp, ring_plus1)
            .unwrap_or_else(|e| panic!("set_class_ring: {e}"));
    }
    m.remove_tx_port(LO)
        .unwrap_or_else(|e| panic!("remove_tx_port: {e}"));
    write_ring3_slots(h);
    h.dp.set_id_ranges(&id_ranges())
        .unwrap_or_else(|e| panic!("set_id_ranges: {e}"));
}

/// Static session-id ranges: ESP SPIs 0xc4…/0xc6… on backends 4 (IPv6, up) and 6 (down, then up
/// in phase B), IKE SPI labels 0x05…/0x03… on 5 (draining) and 3 (up, then down in phase B).
fn id_ranges() -> Vec<(vpnlb::dataplane::session_ids::IdPrefix, u32)> {
    use vpnlb::dataplane::session_ids::{esp_range_prefixes, ike_label_prefix};
    let mut v = Vec::new();
    for (min, max, id) in [(0xc400_0000, 0xc4ff_ffff, 4), (0xc600_0100, 0xc6ff_ff00, 6)] {
        v.extend(esp_range_prefixes(min, max).into_iter().map(|p| (p, id)));
    }
    for (label, id) in [(0x0500_0000_0000_0000, 5), (0x0300_0000_0000_0000, 3)] {
        let p = ike_label_prefix(0xff00_0000_0000_0000, label).expect("prefix mask");
        v.push((p, id));
    }
    v
}

/// A payload carrying session id number `n` (in a static range when `ranged`) for `d`'s id
/// protocol, `None` when the VIP learns no ids. NAT-T ports alternate ESP-in-UDP and IKE.
fn id_payload(d: &VipDef, n: u32, ranged: bool) -> Option<Vec<u8>> {
    use packet::vpn::*;
    let ike_spi = u64::from(n)
        | if ranged {
            0x0500_0000_0000_0000
        } else {
            0x7700_0000_0000_0000
        };
    let spi = n | if ranged { 0xc400_0000 } else { 0x5500_0000 };
    let f = d.flags;
    Some(if f & VIP_F_IDS_WIREGUARD != 0 {
        wireguard(if n.is_multiple_of(3) { 2 } else { 4 }, 0x3300_0000 | n)
    } else if f & VIP_F_IDS_OPENVPN != 0 {
        openvpn_data_v2(n & 0xff_ffff, 40)
    } else if f & VIP_F_IDS_IPSEC == 0 {
        return None;
    } else if d.proto == PROTO_ESP {
        // vip_frame builds native ESP; the SPI goes there, this payload is its body.
        return Some(spi.to_be_bytes().to_vec());
    } else if d.port == 500 {
        ike(9, ike_spi, 60)
    } else if n.is_multiple_of(2) {
        esp_in_udp(spi, n, 64)
    } else {
        natt_ike(9, ike_spi, 60)
    })
}

/// Roaming sequences for every VIP that learns ids: a client sends an id-carrying packet twice
/// (new flow, then a hit that learns the id), then the same id from two new source ports and
/// from a new address (five-tuple misses that the id keeps on the learned backend); and ids inside
/// the static ranges, never learned before, from fresh clients.
fn id_sequences(defs: &[VipDef], add: &mut impl FnMut(String, Vec<u8>)) {
    for d in defs {
        if id_payload(d, 0, false).is_none() {
            continue;
        }
        let label = vpnlb::dataplane::vip_label(&d.key());
        for k in 1..=4u8 {
            let n = 0x1000 * u32::from(k) + d.vip_id;
            let payload = id_payload(d, n, false).expect("an id VIP");
            let steps = [
                (k, 45000u16),
                (k, 45000),
                (k, 45001),
                (k, 45002),
                (k + 100, 45003),
            ];
            for (i, (c, sport)) in steps.into_iter().enumerate() {
                let f = id_frame(d, c, sport, &payload);
                add(format!("{label} id {n:#x} step {i}"), f.bytes());
            }
            if d.flags & VIP_F_IDS_OPENVPN != 0 {
                // The same peer-id from another client (another gateway numbers from 0 too): its
                // own id, learned and kept over a rebinding, interleaved with the first client.
                for (i, (c, sport)) in [
                    (k + 50, 45000),
                    (k + 50, 45000),
                    (k, 45002),
                    (k + 50, 45001),
                ]
                .into_iter()
                .enumerate()
                {
                    let f = id_frame(d, c, sport, &payload);
                    add(
                        format!("{label} id {n:#x} second client step {i}"),
                        f.bytes(),
                    );
                }
            }
            let ranged = id_payload(d, n, true).expect("an id VIP");
            let f = id_frame(d, k + 150, 46000, &ranged);
            add(format!("{label} ranged id {n:#x}"), f.bytes());
        }
        if d.proto == PROTO_UDP && d.port == 4500 {
            let f = id_frame(d, 9, 47000, &packet::vpn::NATT_KEEPALIVE);
            add(format!("{label} keepalive"), f.bytes());
        }
    }
}

/// Fragmented datagrams to every VIP: one in order, one out of order (later fragments before the
/// first, then after it), with distinct identifications.
fn fragment_sequences(defs: &[VipDef], add: &mut impl FnMut(String, Vec<u8>)) {
    for (n, d) in defs.iter().enumerate() {
        let label = vpnlb::dataplane::vip_label(&d.key());
        for (k, order) in [(31u8, [0usize, 1, 2, 3]), (32, [2, 0, 3, 1])] {
            let f = vip_frame(d, k, 100, packet::TCP_ACK);
            let frags = packet::fragments(&f, 32, 0x5000 + (n as u32) * 4 + u32::from(k));
            for i in order {
                if let Some(b) = frags.get(i) {
                    add(format!("{label} c{k} fragment {i}"), b.clone());
                }
            }
        }
    }
}

/// ICMP "fragmentation needed" / "packet too big" quoting what each VIP sent to clients that have
/// sessions (the plain frames above) and to clients that have none, whole and truncated at every
/// boundary of the quote; and one sent to an address that is not the quote's source.
fn pmtu_messages(defs: &[VipDef], add: &mut impl FnMut(String, Vec<u8>)) {
    for d in defs {
        let label = vpnlb::dataplane::vip_label(&d.key());
        let router = if d.addr.is_ipv6() { v6(0x99) } else { v4(99) };
        for k in [1u8, 2, 40] {
            let up = vip_frame(d, k, 32, packet::TCP_ACK);
            // The gateway's reply: addresses and ports swapped (ESP: the same SPI field).
            let mut down = up.clone();
            match &mut down.ip {
                packet::Ip::V4(h) => std::mem::swap(&mut h.src, &mut h.dst),
                packet::Ip::V6(h) => std::mem::swap(&mut h.src, &mut h.dst),
            }
            match &mut down.l4 {
                L4::Udp { sport, dport, .. } | L4::Tcp { sport, dport, .. } => {
                    std::mem::swap(sport, dport)
                }
                _ => {}
            }
            let q = down.ip_bytes();
            let hdr = if d.addr.is_ipv6() { 40 } else { 20 };
            for cut in [q.len(), hdr + 8, hdr + 4, hdr + 3, hdr] {
                let f = packet::icmp_too_big(router, d.addr, 1280, &q[..cut.min(q.len())]);
                add(format!("{label} c{k} pmtu quote {cut}"), f.bytes());
            }
        }
        let other = if d.addr.is_ipv6() { v6(0x98) } else { v4(98) };
        let q = vip_frame(d, 3, 16, packet::TCP_ACK).ip_bytes();
        let f = packet::icmp_too_big(router, other, 1280, &q);
        add(format!("{label} pmtu to another address"), f.bytes());
    }
}

/// A frame of `d` from client `k`, port `sport`, with `payload` (for ESP: `payload` is the SPI).
fn id_frame(d: &VipDef, k: u8, sport: u16, payload: &[u8]) -> Frame {
    let c = client(d.addr.is_ipv6(), k);
    if d.proto == PROTO_ESP {
        let spi = u32::from_be_bytes(payload[..4].try_into().expect("4-byte SPI"));
        return Frame::esp(c, d.addr, spi, u32::from(sport), &[0x5a; 40]);
    }
    Frame::udp(c, sport, d.addr, d.port, payload)
}

/// Sessions seeded before the run: capture flows and synthetic flows of the idle VIP pointing at
/// every kind of backend, some of them stale.
fn seed_sessions(h: &mut Harness, captures: &[(String, Vec<Vec<u8>>)]) {
    let now = coarse_now();
    let stale = now.wrapping_sub(STALE_NS);
    let mut flows: Vec<FlowKey> = Vec::new();
    for (_, frames) in captures {
        for f in frames {
            let Some(p) = packet::parse(f) else { continue };
            let gw = p.dst == IpAddr::V4(GW4) || p.dst == IpAddr::V6(GW6);
            if gw && !p.fragment && [PROTO_UDP, PROTO_TCP].contains(&p.proto) {
                let k = p.flow_key(f);
                if !flows.contains(&k) {
                    flows.push(k);
                }
            }
        }
    }
    // None = no session (a miss); (backend, stale?).
    let plan: [Option<(u32, bool)>; 12] = [
        Some((6, false)),
        Some((5, true)),
        None,
        Some((9, false)),
        Some((7, false)),
        None,
        Some((10, true)),
        Some((5000, false)),
        Some((8, true)),
        None,
        Some((11, false)),
        Some((3, false)),
    ];
    let mut seeded = 0;
    for (k, p) in flows.iter().zip(plan.iter().cycle()) {
        if let Some((id, old)) = p {
            let s = Session {
                backend_id: *id,
                hash: 0,
                last_seen_ns: if *old { stale } else { now },
            };
            h.set_session(k, &s);
            seeded += 1;
        }
    }
    assert!(
        seeded >= 10,
        "only {seeded} capture flows to seed sessions for"
    );
    // The idle VIP (udp 10.200.0.20:4500): stale → REPICK_IDLE; down and stale → REPICK_DOWN;
    // fresh → HIT; last_seen in the future → a wrapped, huge idle time → REPICK_IDLE.
    let idle_vip = v4(20);
    for (k, id, t) in [
        (1u8, 1u32, stale),
        (2, 6, stale),
        (3, 8, now),
        (5, 1, now.wrapping_add(1 << 63)),
    ] {
        let key = FlowKey::new(
            client(false, k),
            idle_vip,
            40000 + u16::from(k),
            4500,
            PROTO_UDP,
        );
        h.set_session(
            &key,
            &Session {
                backend_id: id,
                hash: 0,
                last_seen_ns: t,
            },
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Packets.

fn load_captures() -> Vec<(String, Vec<Vec<u8>>)> {
    let dir = pcap::captures_dir();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("-c2g.pcap"))
        })
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 7,
        "expected the 7 *-c2g.pcap captures in {}, found {}",
        dir.display(),
        paths.len()
    );
    paths
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let frames = pcap::read(p).into_iter().map(|r| r.data).collect();
            (name, frames)
        })
        .collect()
}

fn with_tcp_options(mut f: Frame, options: &[u8]) -> Frame {
    if let L4::Tcp { options: o, .. } = &mut f.l4 {
        *o = options.to_vec();
    }
    f
}

/// A frame of `d`'s protocol from client `k` with `payload` bytes of payload.
fn vip_frame(d: &VipDef, k: u8, payload: usize, tcp_flags: u8) -> Frame {
    vip_frame_from(d, k, 40000 + u16::from(k), payload, tcp_flags)
}

/// As [`vip_frame`] from source port `sport` (the SPI's low bits for ESP).
fn vip_frame_from(d: &VipDef, k: u8, sport: u16, payload: usize, tcp_flags: u8) -> Frame {
    let c = client(d.addr.is_ipv6(), k);
    let body: Vec<u8> = (0..payload)
        .map(|i| (i * 13 + usize::from(k)) as u8)
        .collect();
    match d.proto {
        PROTO_UDP => Frame::udp(c, sport, d.addr, d.port, &body),
        PROTO_TCP => Frame::tcp(c, sport, d.addr, d.port, tcp_flags, &body),
        _ => Frame::esp(c, d.addr, (u32::from(sport) << 8) | u32::from(k), 1, &body),
    }
}

fn set_tos(f: &mut Frame, tos: u8) {
    match &mut f.ip {
        packet::Ip::V4(h) => h.tos = tos,
        packet::Ip::V6(h) => h.tclass = tos,
    }
}

/// Synthetic packets: for every VIP, three clients × (plain, VLAN + DSCP, IPv4 options or IPv6
/// traffic class, Ethernet padding, trailing garbage, a large one, TCP with options), MTU boundary
/// sweeps, a non-VIP neighbour; and one packet per PASS reason.
fn synthetic(defs: &[VipDef]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: String, f: Vec<u8>| out.push((name, f));
    for d in defs {
        let label = vpnlb::dataplane::vip_label(&d.key());
        for k in 1..=5u8 {
            add(
                format!("{label} c{k} plain"),
                vip_frame(d, k, 32, packet::TCP_SYN).bytes(),
            );
            let mut f =
                vip_frame(d, k, 48, packet::TCP_ACK | packet::TCP_PSH).vlan(100 + u16::from(k));
            set_tos(&mut f, 0xb8 | (k & 3));
            add(format!("{label} c{k} vlan+dscp"), f.bytes());
            let mut f = vip_frame(d, k, 20, packet::TCP_ACK);
            match &mut f.ip {
                packet::Ip::V4(h) => h.options = vec![1, 1, 1, 0, 0x94, 4, 0, 0],
                packet::Ip::V6(h) => h.tclass = 0x2e,
            }
            add(format!("{label} c{k} options"), f.bytes());
            add(
                format!("{label} c{k} padded"),
                vip_frame(d, k, 1, packet::TCP_ACK).pad_to(60).bytes(),
            );
            let mut f = vip_frame(d, k, 10, packet::TCP_ACK);
            f.trailer = vec![0xee; 7];
            add(format!("{label} c{k} trailer"), f.bytes());
            add(
                format!("{label} c{k} large"),
                vip_frame(d, k, 1200, packet::TCP_ACK).bytes(),
            );
            if d.proto == PROTO_TCP {
                let f = with_tcp_options(
                    vip_frame(d, k, 100, packet::TCP_ACK | packet::TCP_PSH),
                    &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                );
                add(format!("{label} c{k} tcp options"), f.bytes());
            }
        }
        // New flows with DSCP 0, AF11, AF41 and EF (traffic classes steer only new flows).
        for k in 1..=2u8 {
            for dscp in [0u8, 10, 34, 46] {
                let mut f = vip_frame_from(d, k, 41000 + u16::from(dscp), 24, packet::TCP_SYN);
                set_tos(&mut f, (dscp << 2) | 1);
                add(format!("{label} c{k} dscp {dscp}"), f.bytes());
            }
        }
        if d.mtu != 0 {
            // Inner lengths around mtu − overhead for every overhead (20, 28, 40, 48).
            let hdr =
                if d.addr.is_ipv6() { 40 } else { 20 } + if d.proto == PROTO_TCP { 20 } else { 8 };
            let mtu = d.mtu as usize;
            for inner in (mtu - 50)..=(mtu - 18) {
                if inner < hdr {
                    continue;
                }
                for k in [6u8, 7] {
                    let f = vip_frame(d, k, inner - hdr, packet::TCP_ACK);
                    add(format!("{label} c{k} inner {inner} (mtu {mtu})"), f.bytes());
                }
            }
        }
        // The same address on a port (or protocol) no VIP has.
        let c = client(d.addr.is_ipv6(), 1);
        let f = match d.proto {
            PROTO_ESP => Frame::udp(c, 40001, d.addr, 9, b"not a vip"),
            _ => Frame::udp(c, 40001, d.addr, d.port.wrapping_add(1), b"not a vip"),
        };
        add(format!("{label} neighbour"), f.bytes());
    }

    id_sequences(defs, &mut add);
    fragment_sequences(defs, &mut add);
    pmtu_messages(defs, &mut add);

    // One packet per PASS reason.
    let vip4 = IpAddr::V4(GW4);
    let vip6 = IpAddr::V6(GW6);
    let c4 = client(false, 9);
    let c6 = client(true, 9);
    let udp4 = || Frame::udp(c4, 1000, vip4, 51820, &[0xab; 16]);
    let udp6 = || Frame::udp(c6, 1000, vip6, 51820, &[0xab; 16]);
    add(
        "arp".into(),
        packet::arp_request(packet::MAC_ROUTER, Ipv4Addr::new(10, 200, 0, 11), GW4),
    );
    add(
        "vlan truncated".into(),
        udp4().vlan(5).bytes()[..16].to_vec(),
    );
    let mut f = udp4().bytes();
    f[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    add("qinq 88a8".into(), f);
    let mut f = udp4().vlan(5).bytes();
    f[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
    add("double 8100".into(), f);
    add("ipv4 truncated".into(), udp4().bytes()[..26].to_vec());
    let mut f = udp4();
    f.v4().version = 5;
    add("ipv4 version 5".into(), f.bytes());
    let mut f = udp4();
    f.v4().ihl = Some(4);
    add("ipv4 ihl 4".into(), f.bytes());
    let mut f = udp4();
    f.v4().ihl = Some(15);
    add("ipv4 ihl 15".into(), f.bytes());
    for tl in [19u16, 27, 1000] {
        let mut f = udp4();
        f.v4().total_len = Some(tl);
        add(format!("ipv4 total length {tl}"), f.bytes());
    }
    for ff in [packet::IPV4_MF, 5, packet::IPV4_DF | 1] {
        let mut f = udp4();
        f.v4().flags_frag = ff;
        add(format!("ipv4 frag {ff:#x}"), f.bytes());
    }
    add(
        "icmp".into(),
        Frame::raw(c4, vip4, packet::IPPROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]).bytes(),
    );
    for proto in [PROTO_UDP, PROTO_TCP, PROTO_ESP] {
        add(
            format!("l4 truncated {proto}"),
            Frame::raw(c4, vip4, proto, &[0x9c, 0x40, 0xca, 0x6c]).bytes(),
        );
        add(
            format!("l4 truncated v6 {proto}"),
            Frame::raw(c6, vip6, proto, &[0x9c, 0x40, 0xca, 0x6c, 0, 0]).bytes(),
        );
    }
    for len in [7u16, 100] {
        let mut f = udp4();
        if let L4::Udp { len: l, .. } = &mut f.l4 {
            *l = Some(len);
        }
        add(format!("udp length {len}"), f.bytes());
    }
    for doff in [4u8, 15] {
        let mut f = Frame::tcp(c4, 1000, vip4, 443, packet::TCP_ACK, &[1; 8]);
        if let L4::Tcp { doff: d, .. } = &mut f.l4 {
            *d = Some(doff);
        }
        add(format!("tcp doff {doff}"), f.bytes());
    }
    add(
        "esp spi 0".into(),
        Frame::esp(c4, vip4, 0, 1, &[0; 16]).bytes(),
    );
    add("ipv6 truncated".into(), udp6().bytes()[..50].to_vec());
    let mut f = udp6();
    f.v6().version = 4;
    add("ipv6 version 4".into(), f.bytes());
    for pl in [0u16, 200] {
        let mut f = udp6();
        f.v6().payload_len = Some(pl);
        add(format!("ipv6 payload length {pl}"), f.bytes());
    }
    let udp = packet::udp_bytes(c6, vip6, 1000, 51820, b"x");
    for nh in [0u8, 43, 60] {
        let mut b = packet::ipv6_options_header(PROTO_UDP);
        b.extend_from_slice(&udp);
        add(
            format!("ipv6 ext {nh}"),
            Frame::raw(c6, vip6, nh, &b).bytes(),
        );
    }
    let mut b = packet::ipv6_fragment_header(PROTO_UDP, 0, true, 7);
    b.extend_from_slice(&udp);
    add("ipv6 fragment".into(), Frame::raw(c6, vip6, 44, &b).bytes());
    add(
        "ipv6 fragment header truncated".into(),
        Frame::raw(c6, vip6, 44, &[17, 0, 0, 1]).bytes(),
    );
    add(
        "icmpv6".into(),
        Frame::raw(c6, vip6, 58, &[128, 0, 0, 0, 0, 1, 0, 1]).bytes(),
    );
    let mut f = udp4().bytes();
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    add("ipv4 under 86dd".into(), f);
    out
}

// ------------------------------------------------------------------------------------------------
// The comparison.

struct Diff {
    h: Harness,
    model: MemMaps,
    veth: (u32, u32),
    /// VIP_STATS / BACKEND_STATS rows compared after every packet.
    vip_rows: Vec<u32>,
    backend_rows: Vec<u32>,
    real_counters: Vec<u64>,
    real_vips: Vec<PktBytes>,
    real_backends: Vec<PktBytes>,
    n_ingress: usize,
    n_decap: usize,
    /// Flow keys of unmutated packets: their sessions survive pruning.
    keep: HashSet<FlowKey>,
    pruned: usize,
    /// New-flow picks (miss or re-pick) whose DSCP mapped to a class ring, per the model's maps.
    class_picks: usize,
    /// The last packet run, for checkpoint failures: (program, index, what, frame).
    last: (String, usize, String, Vec<u8>),
}

fn delta(before: &[u64], after: &[u64]) -> Vec<(u32, u64)> {
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a != b)
        .map(|(i, (b, a))| (i as u32, a.wrapping_sub(*b)))
        .collect()
}

fn pb_delta(b: PktBytes, a: PktBytes) -> PktBytes {
    PktBytes {
        packets: a.packets.wrapping_sub(b.packets),
        bytes: a.bytes.wrapping_sub(b.bytes),
    }
}

fn names(c: &[(u32, u64)]) -> String {
    let v: Vec<String> = c
        .iter()
        .map(|(id, d)| format!("{}(+{d})", counter_name(*id)))
        .collect();
    format!("[{}]", v.join(", "))
}

fn event_names(ev: &[u32]) -> String {
    let v: Vec<&str> = ev.iter().map(|e| counter_name(*e)).collect();
    format!("[{}]", v.join(", "))
}

fn describe(r: &ModelResult) -> String {
    format!(
        "verdict {}, outcome {}, events {}, backend {:?}, hash {:?}, flow {:?}",
        action_name(r.action),
        counter_name(r.outcome),
        event_names(&r.events),
        r.backend_id,
        r.hash,
        r.flow
    )
}

impl Diff {
    fn new(captures: &[(String, Vec<Vec<u8>>)]) -> Diff {
        let mut h = Harness::with_netns();
        let veth = h.netns.as_ref().expect("netns").veth;
        program(&mut h);
        seed_sessions(&mut h, captures);
        let mut model = MemMaps::snapshot(h.maps())
            .unwrap_or_else(|e| panic!("snapshot of the real maps: {e}"));
        model.env.max_sessions = MAX_SESSIONS;
        assert_eq!(model.env.ring_rows, 4, "the harness loads 4 ring rows");
        let mut vip_rows: Vec<u32> = model
            .vips
            .values()
            .map(|v| v.vip_id)
            .filter(|id| *id < MAX_VIPS)
            .collect();
        vip_rows.sort_unstable();
        vip_rows.dedup();
        let backend_rows: Vec<u32> = (0..=16).collect();
        let mut d = Diff {
            h,
            model,
            veth,
            vip_rows,
            backend_rows,
            real_counters: Vec::new(),
            real_vips: Vec::new(),
            real_backends: Vec::new(),
            n_ingress: 0,
            n_decap: 0,
            keep: HashSet::new(),
            pruned: 0,
            class_picks: 0,
            last: (String::new(), 0, "nothing run yet".into(), Vec::new()),
        };
        d.real_counters = d.read_counters();
        (d.real_vips, d.real_backends) = d.read_rows();
        assert!(
            d.real_counters.iter().all(|c| *c == 0),
            "fresh maps have zero counters"
        );
        d.checkpoint("start");
        d
    }

    fn read_counters(&self) -> Vec<u64> {
        self.h
            .maps()
            .counters()
            .unwrap_or_else(|e| panic!("reading STATS: {e}"))
    }

    fn read_rows(&self) -> (Vec<PktBytes>, Vec<PktBytes>) {
        let m = self.h.maps();
        let vips = self
            .vip_rows
            .iter()
            .map(|i| {
                m.vip_stats(*i)
                    .unwrap_or_else(|e| panic!("VIP_STATS[{i}]: {e}"))
            })
            .collect();
        let backends = self
            .backend_rows
            .iter()
            .map(|i| {
                m.backend_stats(*i)
                    .unwrap_or_else(|e| panic!("BACKEND_STATS[{i}]: {e}"))
            })
            .collect();
        (vips, backends)
    }

    /// Ingress ifindex: mostly veth0; sometimes veth1 (backends on veth1 then TX and those on
    /// veth0 redirect) or lo (the backend whose egress is lo then TXes instead of failing).
    fn pick_ifindex(&self, rng: &mut Rng) -> u32 {
        match rng.below(100) {
            0..=79 => self.veth.0,
            80..=91 => self.veth.1,
            _ => LO,
        }
    }

    fn test_run(&mut self, prog: &str, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let (action, out, _) = self
            .h
            .try_test_run(prog, frame, ifindex)
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN of {prog} ({} byte frame, ifindex {ifindex}): {e}",
                    frame.len()
                )
            });
        (action, out)
    }

    /// Runs one frame through `vpnlb_ingress` and the model and compares everything.
    fn ingress(&mut self, frame: &[u8], ifindex: u32, what: &str) -> (ModelResult, Vec<u8>) {
        let idx = self.n_ingress;
        self.n_ingress += 1;
        self.last = ("ingress".into(), idx, what.to_string(), frame.to_vec());
        let now = coarse_now();
        let (action, out) = self.test_run(prog_names::INGRESS, frame, ifindex);
        let m_counters = self.model.counters.clone();
        let m_vips: Vec<PktBytes> = self.model_vip_rows();
        let m_backends: Vec<PktBytes> = self.model_backend_rows();
        let ctx = ModelCtx {
            ingress_ifindex: ifindex,
            now_ns: now,
        };
        let model = &mut self.model;
        let r = no_model_panic("ingress", idx, what, frame, &out, || {
            model::run_ingress(model, frame, &ctx)
        });
        if class_pick(&self.model, frame, &r) {
            self.class_picks += 1;
        }
        let counters = self.read_counters();
        let real = delta(&self.real_counters, &counters);
        self.real_counters = counters;
        let modeled = delta(&m_counters, &self.model.counters);
        let (vips, backends) = self.read_rows();

        let mut problems = Vec::new();
        if action != r.action {
            problems.push(format!(
                "verdict: XDP {} ({action}), model {} ({})",
                action_name(action),
                action_name(r.action),
                r.action
            ));
        }
        match action {
            XDP_PASS => {
                if out != frame {
                    problems.push("XDP_PASS modified the frame".into());
                }
            }
            XDP_TX | XDP_REDIRECT => {
                if r.action != XDP_DROP && out != r.frame {
                    problems.push(format!(
                        "output differs (XDP {} bytes, model {} bytes, first difference at byte {})",
                        out.len(),
                        r.frame.len(),
                        first_diff(&out, &r.frame)
                    ));
                }
                if [FWD_IPIP, FWD_GUE].contains(&r.outcome)
                    && let Err(e) = packet::check_outer(&out, mutate::layout(frame).l2)
                {
                    problems.push(format!("outer headers of the XDP output: {e}"));
                }
            }
            XDP_DROP => {}
            a => problems.push(format!("unexpected verdict {a} ({})", action_name(a))),
        }
        if r.action == XDP_PASS && r.frame != frame {
            problems.push("the model modified a PASS frame".into());
        }
        let outcomes: Vec<(u32, u64)> = real
            .iter()
            .copied()
            .filter(|(id, _)| INGRESS_OUTCOMES.contains(id))
            .collect();
        if outcomes != [(r.outcome, 1)] {
            problems.push(format!(
                "outcome: XDP moved {}, model says {}",
                names(&outcomes),
                counter_name(r.outcome)
            ));
        }
        let mut events: Vec<u32> = Vec::new();
        for (id, d) in real.iter().filter(|(id, _)| !INGRESS_OUTCOMES.contains(id)) {
            events.extend(std::iter::repeat_n(*id, *d as usize));
        }
        let mut want_events = r.events.clone();
        want_events.sort_unstable();
        if events != want_events {
            problems.push(format!(
                "session events: XDP {}, model {}",
                event_names(&events),
                event_names(&r.events)
            ));
        }
        if real != modeled {
            problems.push(format!(
                "counters: XDP moved {}, model moved {}",
                names(&real),
                names(&modeled)
            ));
        }
        self.compare_rows(&mut problems, &vips, &backends, &m_vips, &m_backends);
        self.real_vips = vips;
        self.real_backends = backends;
        if !problems.is_empty() {
            self.fail(
                "ingress", idx, what, frame, ifindex, action, &out, &r, &real, &problems,
            );
        }
        if self.n_ingress.is_multiple_of(CHECK_EVERY) {
            self.checkpoint(&format!("after {} ingress packets", self.n_ingress));
        }
        (r, out)
    }

    fn model_vip_rows(&self) -> Vec<PktBytes> {
        self.vip_rows
            .iter()
            .map(|i| self.model.vip_stats.get(i).copied().unwrap_or_default())
            .collect()
    }

    fn model_backend_rows(&self) -> Vec<PktBytes> {
        self.backend_rows
            .iter()
            .map(|i| self.model.backend_stats.get(i).copied().unwrap_or_default())
            .collect()
    }

    fn compare_rows(
        &self,
        problems: &mut Vec<String>,
        vips: &[PktBytes],
        backends: &[PktBytes],
        m_vips: &[PktBytes],
        m_backends: &[PktBytes],
    ) {
        let mv = self.model_vip_rows();
        let mb = self.model_backend_rows();
        let rows =
            |ids: &[u32], rb: &[PktBytes], ra: &[PktBytes], mb: &[PktBytes], ma: &[PktBytes]| {
                let mut v = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    let (x, m) = (pb_delta(rb[i], ra[i]), pb_delta(mb[i], ma[i]));
                    if x != m {
                        v.push(format!(
                            "row {id}: XDP +{}p/+{}B, model +{}p/+{}B",
                            x.packets, x.bytes, m.packets, m.bytes
                        ));
                    }
                }
                v
            };
        for p in rows(&self.vip_rows, &self.real_vips, vips, m_vips, &mv) {
            problems.push(format!("VIP_STATS {p}"));
        }
        for p in rows(
            &self.backend_rows,
            &self.real_backends,
            backends,
            m_backends,
            &mb,
        ) {
            problems.push(format!("BACKEND_STATS {p}"));
        }
    }

    /// Runs one frame through `vpnlb_decap` and the model's decap and compares; returns the verdict,
    /// outcome and output.
    fn decap(&mut self, frame: &[u8], ifindex: u32, what: &str) -> (u32, u32, Vec<u8>) {
        let idx = self.n_decap;
        self.n_decap += 1;
        self.last = ("decap".into(), idx, what.to_string(), frame.to_vec());
        let (action, out) = self.test_run(prog_names::DECAP, frame, ifindex);
        let m_counters = self.model.counters.clone();
        let model = &mut self.model;
        let r = no_model_panic("decap", idx, what, frame, &out, || {
            model::run_decap(model, frame)
        });
        let counters = self.read_counters();
        let real = delta(&self.real_counters, &counters);
        self.real_counters = counters;
        let modeled = delta(&m_counters, &self.model.counters);
        let mut problems = Vec::new();
        if action != r.action {
            problems.push(format!(
                "verdict: XDP {}, model {}",
                action_name(action),
                action_name(r.action)
            ));
        }
        if action != XDP_DROP && r.action != XDP_DROP && out != r.frame {
            problems.push(format!(
                "output differs (XDP {} bytes, model {} bytes, first difference at byte {})",
                out.len(),
                r.frame.len(),
                first_diff(&out, &r.frame)
            ));
        }
        if real != [(r.outcome, 1)] || real != modeled {
            problems.push(format!(
                "counters: XDP moved {}, model moved {} (outcome {})",
                names(&real),
                names(&modeled),
                counter_name(r.outcome)
            ));
        }
        if !problems.is_empty() {
            self.fail(
                "decap", idx, what, frame, ifindex, action, &out, &r, &real, &problems,
            );
        }
        (action, r.outcome, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn fail(
        &self,
        prog: &str,
        idx: usize,
        what: &str,
        input: &[u8],
        ifindex: u32,
        action: u32,
        out: &[u8],
        r: &ModelResult,
        real: &[(u32, u64)],
        problems: &[String],
    ) -> ! {
        let path = pcap_dir().join(format!("differential-{prog}-{idx}.pcap"));
        let saved = match pcap::write(&path, &[input, out, &r.frame]) {
            Ok(()) => format!("pcap (input, XDP output, model output): {}", path.display()),
            Err(e) => format!("could not write {}: {e}", path.display()),
        };
        panic!(
            "differential mismatch at {prog} packet #{idx} ({what}), ingress ifindex {ifindex}, \
             after {} ingress / {} decap packets:\n  - {}\n\
             XDP:   verdict {}, counters {}\n\
             model: {}\n{saved}\n\
             -- input ({} bytes)\n{}-- XDP output ({} bytes)\n{}-- model output ({} bytes)\n{}",
            self.n_ingress,
            self.n_decap,
            problems.join("\n  - "),
            action_name(action),
            names(real),
            describe(r),
            input.len(),
            hexdump_diff(input, input),
            out.len(),
            hexdump_diff(out, &r.frame),
            r.frame.len(),
            hexdump_diff(&r.frame, out),
        );
    }

    /// Compares the whole session table (key → backend), every counter and every stats row; then
    /// prunes sessions of mutated flows from both sides when the table grows.
    fn checkpoint(&mut self, label: &str) {
        let mut problems = Vec::new();
        let real: HashMap<FlowKey, (u32, u32)> = self
            .h
            .sessions()
            .into_iter()
            .map(|(k, s)| (k, (s.backend_id, s.hash)))
            .collect();
        let modeled: HashMap<FlowKey, (u32, u32)> = self
            .model
            .sessions
            .iter()
            .map(|(k, s)| (*k, (s.backend_id, s.hash)))
            .collect();
        if real != modeled {
            let mut diffs: Vec<String> = Vec::new();
            for (k, v) in &real {
                if modeled.get(k) != Some(v) {
                    diffs.push(format!("{k:?}: XDP {v:?}, model {:?}", modeled.get(k)));
                }
            }
            for (k, v) in &modeled {
                if !real.contains_key(k) {
                    diffs.push(format!("{k:?}: XDP none, model {v:?}"));
                }
            }
            diffs.sort();
            diffs.truncate(10);
            problems.push(format!(
                "sessions (backend, pad) differ: XDP {} entries, model {}; first differences:\n      {}",
                real.len(),
                modeled.len(),
                diffs.join("\n      ")
            ));
        }
        let real_ids: HashMap<IdKey, u32> = self
            .h
            .maps()
            .session_ids()
            .unwrap_or_else(|e| panic!("reading SESSION_IDS: {e}"))
            .into_iter()
            .collect();
        if real_ids != self.model.session_ids {
            let mut diffs: Vec<String> = real_ids
                .iter()
                .filter(|(k, v)| self.model.session_ids.get(k) != Some(v))
                .map(|(k, v)| format!("{k:?}: XDP {v}, model {:?}", self.model.session_ids.get(k)))
                .chain(
                    self.model
                        .session_ids
                        .iter()
                        .filter(|(k, _)| !real_ids.contains_key(k))
                        .map(|(k, v)| format!("{k:?}: XDP none, model {v}")),
                )
                .collect();
            diffs.sort();
            diffs.truncate(10);
            problems.push(format!(
                "learned ids differ: XDP {} entries, model {}; first differences:\n      {}",
                real_ids.len(),
                self.model.session_ids.len(),
                diffs.join("\n      ")
            ));
        }
        let real_frags: HashMap<FragKey, (u32, u32)> = self
            .h
            .maps()
            .frags()
            .unwrap_or_else(|e| panic!("reading FRAGS: {e}"))
            .into_iter()
            .map(|(k, s)| (k, (s.backend_id, s.hash)))
            .collect();
        let model_frags: HashMap<FragKey, (u32, u32)> = self
            .model
            .frags
            .iter()
            .map(|(k, s)| (*k, (s.backend_id, s.hash)))
            .collect();
        if real_frags != model_frags {
            problems.push(format!(
                "fragment records differ: XDP {} entries, model {}",
                real_frags.len(),
                model_frags.len()
            ));
        }
        let counters = self.read_counters();
        if counters != self.model.counters {
            let diffs: Vec<String> = counters
                .iter()
                .zip(&self.model.counters)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| format!("{} XDP {a} model {b}", counter_name(i as u32)))
                .collect();
            problems.push(format!("counters differ: {}", diffs.join(", ")));
        }
        let m = self.h.maps();
        for i in 0..MAX_VIPS {
            let x = m
                .vip_stats(i)
                .unwrap_or_else(|e| panic!("VIP_STATS[{i}]: {e}"));
            let y = self.model.vip_stats.get(&i).copied().unwrap_or_default();
            if x != y {
                problems.push(format!("VIP_STATS[{i}]: XDP {x:?}, model {y:?}"));
            }
        }
        for i in 0..MAX_BACKENDS {
            let x = m
                .backend_stats(i)
                .unwrap_or_else(|e| panic!("BACKEND_STATS[{i}]: {e}"));
            let y = self
                .model
                .backend_stats
                .get(&i)
                .copied()
                .unwrap_or_default();
            if x != y {
                problems.push(format!("BACKEND_STATS[{i}]: XDP {x:?}, model {y:?}"));
            }
        }
        if !problems.is_empty() {
            let (prog, idx, what, frame) = &self.last;
            let path = pcap_dir().join(format!("differential-checkpoint-{prog}-{idx}.pcap"));
            let saved = match pcap::write(&path, &[frame]) {
                Ok(()) => format!("pcap of the last packet: {}", path.display()),
                Err(e) => format!("could not write {}: {e}", path.display()),
            };
            panic!(
                "differential checkpoint \"{label}\" failed after {} ingress / {} decap packets \
                 (last: {prog} packet #{idx}, {what}):\n  - {}\n{saved}\n-- last input\n{}",
                self.n_ingress,
                self.n_decap,
                problems.join("\n  - "),
                hexdump_diff(frame, frame)
            );
        }
        if real.len() > PRUNE_ABOVE {
            let gone: Vec<FlowKey> = real
                .keys()
                .filter(|k| !self.keep.contains(k))
                .copied()
                .collect();
            for k in &gone {
                self.h
                    .maps_mut()
                    .remove_session(k)
                    .unwrap_or_else(|e| panic!("remove_session: {e}"));
                self.model.sessions.remove(k);
            }
            self.pruned += gone.len();
        }
    }

    /// After a control-plane change through the real maps: the model takes over config, VIPs,
    /// backends, rings and TX ports (its sessions, counters and stats carry on).
    fn sync_control_plane(&mut self) {
        let fresh = MemMaps::snapshot(self.h.maps())
            .unwrap_or_else(|e| panic!("snapshot of the real maps: {e}"));
        self.model.config = fresh.config;
        self.model.vips = fresh.vips;
        self.model.backends = fresh.backends;
        self.model.rings = fresh.rings;
        self.model.tx_ports = fresh.tx_ports;
        self.model.class_rings = fresh.class_rings;
        self.model.id_ranges = fresh.id_ranges;
        self.model.frag_vips = fresh.frag_vips;
    }

    /// Runs `vpnlb_decap` on an ingress output that was encapsulated (and on mutations of it).
    fn decap_encapsulated(
        &mut self,
        rng: &mut Rng,
        targets: &Targets,
        input: &[u8],
        r: &ModelResult,
        out: &[u8],
        what: &str,
    ) {
        let ifindex = self.pick_ifindex(rng);
        let (action, outcome, dec) = self.decap(out, ifindex, &format!("encap of {what}"));
        if [DECAP_IPIP, DECAP_GUE].contains(&outcome) {
            // Decapsulation restores the client's packet behind the backend's MACs.
            let mut want = input.to_vec();
            want[..12].copy_from_slice(&out[..12]);
            if action != XDP_PASS || dec != want {
                self.fail(
                    "decap",
                    self.n_decap - 1,
                    &format!("round trip of {what}: decap(encap(x)) must be x with the new MACs"),
                    out,
                    ifindex,
                    action,
                    &dec,
                    &ModelResult {
                        frame: want,
                        ..r.clone()
                    },
                    &[],
                    &["round trip".into()],
                );
            }
        }
        for i in 0..2 {
            let m = mutate::mutate_decap(rng, out, targets);
            let ifindex = self.pick_ifindex(rng);
            self.decap(&m, ifindex, &format!("mutant {i} of the encap of {what}"));
        }
    }
}

/// Runs the model; if it panics (an overflow, a failed assertion), fails like a mismatch: a pcap
/// (input, XDP output) and the packet's index and hex.
fn no_model_panic<T>(
    prog: &str,
    idx: usize,
    what: &str,
    input: &[u8],
    xdp_out: &[u8],
    f: impl FnOnce() -> T,
) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            let path = pcap_dir().join(format!("differential-{prog}-{idx}.pcap"));
            let saved = match pcap::write(&path, &[input, xdp_out]) {
                Ok(()) => format!("pcap (input, XDP output): {}", path.display()),
                Err(e) => format!("could not write {}: {e}", path.display()),
            };
            panic!(
                "the model panicked on {prog} packet #{idx} ({what}): {msg}\n{saved}\n-- input ({} bytes)\n{}",
                input.len(),
                hexdump_diff(input, input)
            );
        }
    }
}

/// True when the model's pick for this packet (a miss or re-pick) went through a class ring.
fn class_pick(model: &MemMaps, frame: &[u8], r: &ModelResult) -> bool {
    let picked = r
        .events
        .iter()
        .any(|e| [SESSION_MISS, SESSION_REPICK_DOWN, SESSION_REPICK_IDLE].contains(e));
    let Some(vip) = r.vip.and_then(|k| model.vips.get(&k)) else {
        return false;
    };
    if !picked || vip.flags & VIP_F_CLASSES == 0 || vip.ring_size == 0 {
        return false;
    }
    let l3 = mutate::layout(frame).l2;
    let tos = match r.flow.map(|f| f.family) {
        Some(FAMILY_V4) => frame[l3 + 1],
        _ => (frame[l3] << 4) | (frame[l3 + 1] >> 4),
    };
    let idx = vip
        .vip_id
        .wrapping_mul(DSCP_VALUES)
        .wrapping_add(u32::from(tos >> 2));
    model.class_rings.get(&idx).is_some_and(|c| *c != 0)
}

fn first_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Runs one ingress packet, then the decap program on what it produced (and every third input).
fn run_one(d: &mut Diff, rng: &mut Rng, targets: &Targets, frame: &[u8], what: &str, base: bool) {
    let ifindex = d.pick_ifindex(rng);
    let (r, out) = d.ingress(frame, ifindex, what);
    if base && let Some(k) = r.flow {
        d.keep.insert(k);
    }
    if [XDP_TX, XDP_REDIRECT].contains(&r.action) && [FWD_IPIP, FWD_GUE].contains(&r.outcome) {
        d.decap_encapsulated(rng, targets, frame, &r, &out, what);
    }
    if d.n_ingress.is_multiple_of(3) {
        let ifindex = d.pick_ifindex(rng);
        d.decap(frame, ifindex, &format!("ingress input {what}"));
    }
}

fn base_pass(
    d: &mut Diff,
    rng: &mut Rng,
    targets: &Targets,
    captures: &[(String, Vec<Vec<u8>>)],
    synthetic: &[(String, Vec<u8>)],
    phase: &str,
) {
    for (name, frames) in captures {
        for (i, f) in frames.iter().enumerate() {
            run_one(
                d,
                rng,
                targets,
                f,
                &format!("{phase}: {name} frame {}", i + 1),
                true,
            );
        }
    }
    for (name, f) in synthetic {
        run_one(
            d,
            rng,
            targets,
            f,
            &format!("{phase}: synthetic {name}"),
            true,
        );
    }
}

fn mutation_pass(
    d: &mut Diff,
    rng: &mut Rng,
    targets: &Targets,
    corpus: &[(String, Vec<u8>)],
    n: usize,
    phase: &str,
) {
    for i in 0..n {
        let (name, seed) = &corpus[rng.below(corpus.len())];
        let mut m = mutate::mutate(rng, seed, targets);
        // Now and then a mutant of a mutant.
        if rng.chance(1, 5) {
            m = mutate::mutate(rng, &m, targets);
        }
        run_one(
            d,
            rng,
            targets,
            &m,
            &format!("{phase}: mutant {i} of {name}"),
            false,
        );
    }
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn xdp_and_model_agree() {
    let t0 = Instant::now();
    let captures = load_captures();
    let defs = vip_defs();
    let synthetic = synthetic(&defs);
    let mut corpus: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, frames) in &captures {
        for (i, f) in frames.iter().enumerate() {
            corpus.push((format!("{name} frame {}", i + 1), f.clone()));
        }
    }
    corpus.extend(
        synthetic
            .iter()
            .map(|(n, f)| (format!("synthetic {n}"), f.clone())),
    );
    let mut targets = Targets::default();
    for d in &defs {
        match d.addr {
            IpAddr::V4(a) if !targets.v4.contains(&a.octets()) => targets.v4.push(a.octets()),
            IpAddr::V6(a) if !targets.v6.contains(&a.octets()) => targets.v6.push(a.octets()),
            _ => {}
        }
        if d.port != 0 && !targets.ports.contains(&d.port) {
            targets.ports.push(d.port);
        }
    }
    targets.ports.extend([GUE_PORT, OTHER_GUE_PORT]);

    let mut d = Diff::new(&captures);
    let mut rng = Rng::new(SEED);

    // Phase A.
    base_pass(&mut d, &mut rng, &targets, &captures, &synthetic, "A");
    mutation_pass(
        &mut d,
        &mut rng,
        &targets,
        &corpus,
        MUTATIONS_PER_PHASE,
        "A",
    );
    d.checkpoint("end of phase A");

    // Control-plane change: 3 goes down (its sessions re-pick), 2 drains (its sessions stay), 6
    // comes up (the empty ring fills); the agent rewrites the rings, ring 3's hand-written slots are
    // written again on top.
    d.h.set_backend_state(3, BACKEND_DOWN);
    d.h.set_backend_state(2, BACKEND_DRAINING);
    d.h.set_backend_state(6, BACKEND_UP);
    // AF41 leaves the class, AF11 joins it (CLASS_RINGS set before / cleared after the VIP entry).
    let mut spec = vip_spec(&defs[12]);
    spec.classes[0].dscp = vec![46, 10];
    d.h.upsert_vip(spec);
    write_ring3_slots(&mut d.h);
    d.sync_control_plane();

    // Phase B.
    base_pass(&mut d, &mut rng, &targets, &captures, &synthetic, "B");
    mutation_pass(
        &mut d,
        &mut rng,
        &targets,
        &corpus,
        MUTATIONS_PER_PHASE,
        "B",
    );
    d.checkpoint("end");

    let totals = d.read_counters();
    let coverage: Vec<String> = totals
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{}={n}", counter_name(i as u32)))
        .collect();
    println!(
        "differential: {} ingress + {} decap packets agree (XDP vs model), {} class-ring picks, \
         {} sessions pruned, {:.1} s; \
         counters: {}",
        d.n_ingress,
        d.n_decap,
        d.class_picks,
        d.pruned,
        t0.elapsed().as_secs_f64(),
        coverage.join(" ")
    );

    let mut required: Vec<u32> = (PASS_NOT_IP..=PASS_ESP_BAD_SPI).collect();
    required.extend([
        FWD_L2DSR_TX,
        FWD_L2DSR_REDIRECT,
        FWD_IPIP,
        FWD_GUE,
        DROP_NO_BACKEND,
        DROP_BACKEND_DOWN,
        DROP_BACKEND_BAD,
        DROP_ENCAP_TOO_BIG,
        DROP_REDIRECT_FAILED,
        SESSION_HIT,
        SESSION_MISS,
        SESSION_INSERT,
        SESSION_REPICK_DOWN,
        SESSION_REPICK_IDLE,
        SESSION_ID_LEARNED,
        SESSION_ID_USED,
        SESSION_ID_REJECTED,
        FRAG_RECORD,
        FRAG_HIT,
        FRAG_MISS,
        PASS_ICMP_BAD_QUOTE,
        ICMP_PMTU_SESSION,
        ICMP_PMTU_HASH,
        DECAP_IPIP,
        DECAP_GUE,
        DECAP_PASS,
        DECAP_BAD_INNER,
    ]);
    let missing: Vec<&str> = required
        .iter()
        .filter(|id| totals[**id as usize] == 0)
        .map(|id| counter_name(*id))
        .collect();
    assert!(missing.is_empty(), "counters never reached: {missing:?}");
    assert!(
        d.class_picks > 0,
        "no new flow was picked from a class ring"
    );
    assert!(
        d.n_ingress >= 20_000,
        "only {} ingress packets",
        d.n_ingress
    );
}
